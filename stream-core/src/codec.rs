//! Codecs turn typed values into payload bytes and back.

use std::marker::PhantomData;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::message::{header, Message};
use crate::{Error, ErrorKind, Result};

/// Encodes values of `T` into payloads and decodes them back.
///
/// The codec's [`content_type`](Codec::content_type) is written into the `content-type` header
/// on send. On receive, a message whose `content-type` header names another type is a decode
/// error, so it goes to the dead-letter destination instead of being misread.
pub trait Codec<T>: Send + Sync + 'static {
    /// The media type this codec writes and accepts.
    fn content_type(&self) -> &str;
    /// Serializes `value`.
    fn encode(&self, value: &T) -> Result<Bytes>;
    /// Deserializes a payload.
    fn decode(&self, payload: &[u8]) -> Result<T>;
}

/// Decodes `message` with `codec`, honouring its `content-type` header.
pub(crate) fn decode_message<T: 'static>(codec: &dyn Codec<T>, message: &Message) -> Result<T> {
    if let Some(found) = message.headers().get(header::CONTENT_TYPE) {
        if !same_media_type(found, codec.content_type()) {
            return Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "content-type `{found}` cannot be decoded by the `{}` codec",
                    codec.content_type()
                ),
            ));
        }
    }
    codec.decode(message.payload())
}

/// Compares media types without parameters (`application/json; charset=utf-8`).
fn same_media_type(a: &str, b: &str) -> bool {
    // Runs for every received message: compares in place rather than lowercasing copies.
    fn essence(s: &str) -> &str {
        s.split(';').next().unwrap_or("").trim()
    }
    essence(a).eq_ignore_ascii_case(essence(b))
}

/// JSON through serde_json, the default codec.
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> Json<T> {
    /// The JSON codec for `T`.
    pub fn new() -> Self {
        Json(PhantomData)
    }
}

impl<T> Default for Json<T> {
    fn default() -> Self {
        Json::new()
    }
}

impl<T> Codec<T> for Json<T>
where
    T: Serialize + DeserializeOwned + 'static,
{
    fn content_type(&self) -> &str {
        "application/json"
    }

    fn encode(&self, value: &T) -> Result<Bytes> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| Error::new(ErrorKind::Codec, "cannot encode JSON").with_source(e))
    }

    fn decode(&self, payload: &[u8]) -> Result<T> {
        serde_json::from_slice(payload).map_err(|e| {
            Error::new(ErrorKind::Codec, format!("cannot decode JSON: {e}")).with_source(e)
        })
    }
}

/// Payload bytes as they are (`application/octet-stream`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn content_type(&self) -> &str {
        "application/octet-stream"
    }

    fn encode(&self, value: &Bytes) -> Result<Bytes> {
        Ok(value.clone())
    }

    fn decode(&self, payload: &[u8]) -> Result<Bytes> {
        Ok(Bytes::copy_from_slice(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_errors() {
        let codec = Json::<Vec<u32>>::new();
        let bytes = codec.encode(&vec![1, 2]).unwrap();
        assert_eq!(codec.decode(&bytes).unwrap(), vec![1, 2]);
        let err = codec.decode(b"not json").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
    }

    #[test]
    fn content_type_header_is_honoured() {
        let codec = Json::<u32>::new();
        let ok =
            Message::new(&b"5"[..]).with_header("content-type", "application/json; charset=utf-8");
        assert_eq!(decode_message(&codec, &ok).unwrap(), 5);
        let wrong = Message::new(&b"5"[..]).with_header("content-type", "text/plain");
        assert_eq!(
            decode_message(&codec, &wrong).unwrap_err().kind(),
            ErrorKind::Codec
        );
    }
}
