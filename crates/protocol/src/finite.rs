//! Floats on the wire are finite. JSON has no infinity or NaN, and serde_json writes them as
//! `null`; but a number too large for an `f32` (`1e39`) decodes to infinity. Accepted, such a
//! value could never be sent on: a worker's `Loading` fraction becomes the status report's
//! `load_progress`, which would then encode as `null` and fail to decode in every client. So
//! decoding refuses it, and every message that decodes encodes back to itself.

use serde::de::Error;
use serde::{Deserialize, Deserializer};

/// `#[serde(deserialize_with = "crate::finite::f32")]`
pub(crate) fn f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    check(f32::deserialize(d)?)
}

/// `#[serde(deserialize_with = "crate::finite::fraction")]`: a finite number from 0 to 1.
pub(crate) fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = f32::deserialize(d)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(D::Error::custom(format!(
            "a fraction must be a number from 0 to 1, got {v}"
        )))
    }
}

/// `#[serde(default, deserialize_with = "crate::finite::option_f32")]` (`default` keeps the
/// field optional, as a plain `Option` is).
pub(crate) fn option_f32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    Option::<f32>::deserialize(d)?.map(check).transpose()
}

fn check<E: Error>(v: f32) -> Result<f32, E> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(E::custom(format!(
            "number out of range: {v} (a 32-bit float is at most {:e})",
            f32::MAX
        )))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::control::Response;
    use crate::worker::WorkerMsg;
    use crate::{MAX_FRAME, decode, encode};

    /// Decodes `v`, and checks that the message encodes back into something that decodes.
    fn decodes<T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug>(
        v: &Value,
    ) -> bool {
        let Ok(msg) = decode::<T>(v.to_string().as_bytes()) else {
            return false;
        };
        let frame = encode(&msg, MAX_FRAME).unwrap();
        assert_eq!(decode::<T>(&frame[4..]).unwrap(), msg);
        true
    }

    #[test]
    fn a_loading_fraction_too_large_for_f32_is_refused() {
        // Found by fuzz/fuzz_targets/worker_msg.rs: 1e39 decoded to inf, which encodes as null.
        for bad in ["1e39", "-1e39", "3.5e38", "3.4e38", "1.5", "-0.5"] {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"type":"Loading","fraction":{bad}}}"#)).unwrap();
            assert!(!decodes::<WorkerMsg>(&v), "{bad} was accepted");
        }
        for good in ["0", "0.5", "1", "1e-45"] {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"type":"Loading","fraction":{good}}}"#))
                    .unwrap();
            assert!(decodes::<WorkerMsg>(&v), "{good} was refused");
        }
    }

    #[test]
    fn status_floats_too_large_for_f32_are_refused() {
        let status = |psi: Value, progress: Value| {
            json!({
                "type": "Status",
                "host": {"total": 1, "available": 1, "level": "normal",
                         "psi_some_avg10": psi, "source": "host"},
                "budget": {"usable": 1, "allocated": 0},
                "instances": [{
                    "name": "a", "state": "loading", "thrashing": false, "reason": "",
                    "pid": null, "restarts": 0, "oom_kills": 0, "last_exit": null,
                    "load_progress": progress, "allocated": 0, "estimate_source": "file",
                    "memory": {"current": null, "limit": null, "reservation": null,
                               "peak": null, "last_peak": null},
                    "uptime_s": null
                }]
            })
        };
        assert!(decodes::<Response>(&status(json!(0.25), json!(0.5))));
        assert!(decodes::<Response>(&status(Value::Null, json!(1))));
        assert!(!decodes::<Response>(&status(json!(1e39), json!(0.5))));
        assert!(!decodes::<Response>(&status(json!(0.25), json!(1e39))));
        // psi_some_avg10 stays optional: a report without it decodes.
        let mut v = status(Value::Null, json!(0.5));
        v["host"].as_object_mut().unwrap().remove("psi_some_avg10");
        assert!(decodes::<Response>(&v));
    }
}
