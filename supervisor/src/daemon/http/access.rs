//! Who may use the HTTP API (docs/operations.md, threat model). A loopback listener keeps
//! browsers out: a web page can make the browser send requests to 127.0.0.1, so the `Host`
//! header must name the listener or localhost (DNS rebinding), an `Origin` must be the API's
//! own, and a POST must say `Content-Type: application/json` (which a page cannot send without
//! a CORS preflight, and belljar answers no preflight). With `api_key_file`, every endpoint but
//! `/health` needs `Authorization: Bearer KEY`, compared in constant time.

use std::net::SocketAddr;

use subtle::ConstantTimeEq;

use crate::daemon::requests::ApiError;

/// The listener's access rules.
#[derive(Debug, Clone)]
pub struct Rules {
    pub listen: SocketAddr,
    /// The API key, when `api_key_file` is set.
    pub key: Option<Vec<u8>>,
}

/// What the rules look at in a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen<'a> {
    pub post: bool,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub authorization: Option<&'a str>,
}

impl Rules {
    fn loopback(&self) -> bool {
        self.listen.ip().is_loopback()
    }

    /// The request may go on, or the error it gets.
    pub fn check(&self, r: &Seen<'_>) -> Result<(), ApiError> {
        if self.loopback() {
            match r.host {
                Some(h) if self.local_authority(h) => {}
                Some(h) => {
                    return Err(forbidden(format!(
                        "Host {h:?} is not this API's address ({}) or localhost; belljar refuses it so that no web page can reach a local API through a DNS name",
                        self.listen
                    )));
                }
                None => {
                    return Err(ApiError::new(
                        400,
                        "missing_host",
                        "the request has no Host header; send one (HTTP/1.1 requires it)",
                    ));
                }
            }
        }
        if let Some(origin) = r.origin {
            if !self.origin_allowed(origin, r.host) {
                return Err(forbidden(format!(
                    "Origin {origin:?} is not this API's own; browsers on other sites may not use it"
                )));
            }
        }
        if r.path != "/health" {
            if let Some(key) = &self.key {
                let given = r
                    .authorization
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::trim);
                match given {
                    None => {
                        return Err(ApiError::new(
                            401,
                            "missing_api_key",
                            "this API needs a key: send `Authorization: Bearer KEY` (the key is in the file [http] api_key_file names)",
                        ));
                    }
                    Some(g) if !bool::from(g.as_bytes().ct_eq(key)) => {
                        return Err(ApiError::new(
                            401,
                            "invalid_api_key",
                            "the API key is wrong: send the key in the file [http] api_key_file names",
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        if r.post {
            let json = r.content_type.is_some_and(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
            if !json {
                return Err(ApiError::new(
                    415,
                    "unsupported_media_type",
                    format!(
                        "a POST must carry JSON with `Content-Type: application/json` (got {})",
                        r.content_type
                            .map_or("none".to_owned(), |t| format!("{t:?}"))
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `host[:port]` names this listener: localhost or a loopback address (or the listen
    /// address), on the listen port when a port is given.
    fn local_authority(&self, authority: &str) -> bool {
        let (host, port) = split_authority(authority);
        if port.is_some_and(|p| p != self.listen.port()) {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        host.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == self.listen.ip())
    }

    /// An `Origin` is allowed when it is this API's own: on a loopback listener, localhost or
    /// a loopback address on the listen port; otherwise, the authority the request was sent to.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false; // "null", file://, extensions
        };
        if authority.contains('/') {
            return false;
        }
        if self.loopback() {
            // An Origin without a port is port 80 (or 443).
            let (_, port) = split_authority(authority);
            return port.is_some() && self.local_authority(authority);
        }
        host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
    }
}

/// `host:port` or `[v6]:port` or a bare host.
fn split_authority(a: &str) -> (&str, Option<u16>) {
    let (host, port) = match a.rfind(':') {
        Some(i) if !a[i..].contains(']') => (&a[..i], Some(&a[i + 1..])),
        _ => (a, None),
    };
    match port {
        Some(p) => match p.parse::<u16>() {
            Ok(p) => (host, Some(p)),
            // Not a port: an IPv6 address without brackets, or garbage (then nothing matches).
            Err(_) => (a, Some(0)),
        },
        None => (host, None),
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(403, "forbidden", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(listen: &str, key: Option<&str>) -> Rules {
        Rules {
            listen: listen.parse().unwrap(),
            key: key.map(|k| k.as_bytes().to_vec()),
        }
    }

    fn get<'a>(host: &'a str) -> Seen<'a> {
        Seen {
            path: "/v1/models",
            host: Some(host),
            ..Seen::default()
        }
    }

    fn status(r: &Rules, s: &Seen<'_>) -> u16 {
        r.check(s).err().map_or(200, |e| e.status)
    }

    #[test]
    fn a_loopback_listener_takes_only_local_hosts_on_its_port() {
        let r = rules("127.0.0.1:8080", None);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "127.0.0.1",
        ] {
            assert_eq!(status(&r, &get(ok)), 200, "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "localhost:9999",
            "127.0.0.1:80",
            "10.0.0.1:8080",
            "localhost.evil.example:8080",
            ":::",
            "",
        ] {
            assert_eq!(status(&r, &get(bad)), 403, "{bad}");
        }
        let mut none = get("x");
        none.host = None;
        assert_eq!(status(&r, &none), 400);
    }

    #[test]
    fn origins_must_be_the_apis_own() {
        let r = rules("127.0.0.1:8080", None);
        let with = |o: &'static str| Seen {
            origin: Some(o),
            ..get("127.0.0.1:8080")
        };
        for ok in ["http://127.0.0.1:8080", "http://localhost:8080"] {
            assert_eq!(status(&r, &with(ok)), 200, "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://localhost:3000",
            "http://localhost",
            "null",
            "file://",
            "chrome-extension://abc",
            "http://127.0.0.1:8080/path",
        ] {
            assert_eq!(status(&r, &with(bad)), 403, "{bad}");
        }
        // Behind a key on a public address: the page must come from the host it talks to.
        let public = rules("0.0.0.0:8080", Some("k"));
        let s = Seen {
            origin: Some("http://box.lan:8080"),
            host: Some("box.lan:8080"),
            authorization: Some("Bearer k"),
            path: "/v1/models",
            ..Seen::default()
        };
        assert_eq!(status(&public, &s), 200);
        let s = Seen {
            origin: Some("http://evil.example"),
            ..s
        };
        assert_eq!(status(&public, &s), 403);
    }

    #[test]
    fn a_key_is_needed_everywhere_but_health() {
        let r = rules("127.0.0.1:8080", Some("sekrit"));
        let with = |a: Option<&'static str>, path: &'static str| Seen {
            authorization: a,
            path,
            ..get("localhost:8080")
        };
        assert_eq!(status(&r, &with(None, "/v1/models")), 401);
        assert_eq!(status(&r, &with(Some("Bearer nope"), "/v1/models")), 401);
        assert_eq!(status(&r, &with(Some("Bearer sekri"), "/v1/models")), 401);
        assert_eq!(status(&r, &with(Some("Basic sekrit"), "/v1/models")), 401);
        assert_eq!(status(&r, &with(Some("Bearer sekrit"), "/v1/models")), 200);
        assert_eq!(status(&r, &with(None, "/health")), 200);
        let open = rules("127.0.0.1:8080", None);
        assert_eq!(status(&open, &with(None, "/v1/models")), 200);
    }

    #[test]
    fn a_post_must_say_json() {
        let r = rules("127.0.0.1:8080", None);
        let post = |t: Option<&'static str>| Seen {
            post: true,
            content_type: t,
            ..get("localhost:8080")
        };
        assert_eq!(status(&r, &post(Some("application/json"))), 200);
        assert_eq!(
            status(&r, &post(Some("Application/JSON; charset=utf-8"))),
            200
        );
        for bad in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            assert_eq!(status(&r, &post(bad)), 415, "{bad:?}");
        }
    }
}
