//! Configuration mistakes a user makes, and the errors they get.

use stream_core::{ErrorKind, Streams};

fn load(text: &str) -> stream_core::Result<Streams> {
    Streams::builder()
        .register(binder_memory::register)
        .env(Vec::<(String, String)>::new())
        .load_str(text)
}

#[test]
fn typo_in_a_binding_key_suggests_the_right_one() {
    let err =
        load("[bindings.in]\ndestination = \"d\"\ngroup = \"g\"\nconcurency = 4\n").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message()
            .contains("unknown key `concurency` in bindings.in"),
        "{err}"
    );
    assert!(
        err.message().contains("did you mean `concurrency`?"),
        "{err}"
    );
}

#[test]
fn typo_in_a_binder_setting_is_caught_by_the_binder_config() {
    let err = load("[binders.mem]\ntype = \"memory\"\nretension = 5\n").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message()
            .contains("unknown key `retension` in binders.mem"),
        "{err}"
    );
    assert!(err.message().contains("did you mean `retention`?"), "{err}");
}

#[test]
fn unknown_binder_type_lists_the_registered_ones() {
    let err = load("[binders.main]\ntype = \"memroy\"\n").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownBinderType);
    assert!(err.message().contains("unknown type `memroy`"), "{err}");
    assert!(err.message().contains("did you mean `memory`?"), "{err}");
    assert!(err.message().contains("registered types: memory"), "{err}");
}

#[test]
fn missing_binding_names_the_file_and_the_nearest_binding() {
    let dir = std::env::temp_dir().join(format!("stream-config-{}", stream_core::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("streams.toml");
    std::fs::write(
        &path,
        "default-binder = \"memory\"\n[bindings.orders-out]\ndestination = \"order-events\"\n",
    )
    .unwrap();
    let streams = Streams::builder()
        .register(binder_memory::register)
        .env(Vec::<(String, String)>::new())
        .load_file(&path)
        .unwrap();
    let err = streams.channel("order-out").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingBinding);
    assert!(err.message().contains("no binding `order-out`"), "{err}");
    assert!(err.message().contains(&path.display().to_string()), "{err}");
    assert!(
        err.message().contains("did you mean `orders-out`?"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_file_is_a_config_error_naming_the_path() {
    let err = Streams::builder()
        .load_file("/nonexistent/streams.toml")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("/nonexistent/streams.toml"), "{err}");
}

#[test]
fn a_binding_without_any_binder_is_an_error() {
    let err = load("[bindings.in]\ndestination = \"d\"\n").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("names no binder"), "{err}");
}

#[test]
fn environment_switches_the_default_binder() {
    let text = "default-binder = \"nowhere\"\n[binders.mem]\ntype = \"memory\"\n\
                [bindings.out]\ndestination = \"d\"\n";
    assert!(
        load(text).is_err(),
        "the file alone names an undeclared binder"
    );
    let streams = Streams::builder()
        .register(binder_memory::register)
        .env([("STREAM_DEFAULT_BINDER", "mem")])
        .load_str(text)
        .unwrap();
    assert_eq!(streams.channel("out").unwrap().binder().kind(), "memory");
}

#[tokio::test]
async fn a_batch_larger_than_the_prefetch_is_refused_when_subscribing() {
    let streams = load(
        "default-binder = \"mem\"\n[binders.mem]\ntype = \"memory\"\n\
         [bindings.in]\ndestination = \"d\"\ngroup = \"g\"\nprefetch = 10\nbatch-size = 20\n",
    )
    .expect("the file loads: a per-message handler may use this binding");
    let sink = streams.sink::<String>("in").unwrap();
    let err = sink
        .subscribe_batch(|_: stream_core::Batch<String>| async { Ok::<(), String>(()) })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message()
            .contains("`batch-size` 20 is above `prefetch` 10"),
        "{err}"
    );
    let fine = sink
        .subscribe(|_: String| async { Ok::<(), String>(()) })
        .await;
    fine.expect("per-message handlers are unaffected")
        .shutdown()
        .await
        .unwrap();
}

#[test]
fn a_zero_handler_timeout_is_refused() {
    let err = load("[bindings.in]\ndestination = \"d\"\nhandler-timeout = \"0s\"\n").unwrap_err();
    assert!(
        err.message().contains("`handler-timeout` must be above 0"),
        "{err}"
    );
}

#[test]
fn a_dedup_store_that_is_no_store_is_named() {
    // Refused when the file is loaded, not when a consumer starts.
    let err = load(
        "default-binder = \"mem\"\n[binders.mem]\ntype = \"memory\"\n\
         [bindings.in]\ndestination = \"d\"\ngroup = \"g\"\ndedup = { store = \"mem\" }\n",
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("dedup store `mem`"), "{err}");
    let err =
        load("[bindings.in]\ndestination = \"d\"\ndedup = { store = \"memory\", tll = \"1h\" }\n")
            .unwrap_err();
    assert!(err.message().contains("tll"), "{err}");
}
