//! Which host the console answers and which origin may change things through it.
//!
//! Without `admin.public_url`, a request that changes something must not carry an `Origin`
//! naming another host than its own `Host` ([`super::session::origin_ok`]). With it (the
//! address admins open the console at, e.g. `https://coexist-admin.example.org` behind a
//! TLS proxy), the console also checks the `Host`: it answers only requests for that host
//! or for a loopback address (an SSH tunnel; a proxy that passes the upstream address), so
//! a name an attacker points at the listener (DNS rebinding) gets nothing; and an `Origin`
//! must be the public URL's (or, on a loopback `Host`, that host's own).

use crate::config::PublicUrl;

/// What the check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Host and origin are fine.
    Ok,
    /// `admin.public_url` is set and the request is for another host.
    WrongHost,
    /// The request's `Origin` is another site.
    WrongOrigin,
}

/// Checks a request's `Origin` and `Host` (see the module docs).
pub fn check(public: Option<&PublicUrl>, origin: Option<&str>, host: Option<&str>) -> Site {
    let same = super::session::origin_ok(origin, host);
    let Some(public) = public else {
        return if same { Site::Ok } else { Site::WrongOrigin };
    };
    let host = host.unwrap_or("");
    let on_loopback = PublicUrl::is_loopback_host(host);
    if !public.is_host(host) && !on_loopback {
        return Site::WrongHost;
    }
    match origin {
        None => Site::Ok,
        Some(o) if public.is_origin(o) || (on_loopback && same) => Site::Ok,
        Some(_) => Site::WrongOrigin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_public_url_the_origin_must_name_the_host() {
        assert_eq!(check(None, None, Some("h:1")), Site::Ok);
        assert_eq!(check(None, Some("http://h:1"), Some("h:1")), Site::Ok);
        assert_eq!(
            check(None, Some("http://evil.test"), Some("h:1")),
            Site::WrongOrigin
        );
    }

    #[test]
    fn with_public_url_host_and_origin_are_checked_against_it() {
        let u = PublicUrl::parse("https://Admin.Example.org/").unwrap();
        let u = Some(&u);
        let origin = Some("https://admin.example.org");
        assert_eq!(check(u, origin, Some("admin.example.org")), Site::Ok);
        assert_eq!(check(u, origin, Some("admin.example.org:443")), Site::Ok);
        assert_eq!(check(u, origin, Some("127.0.0.1:8025")), Site::Ok);
        assert_eq!(check(u, None, Some("[::1]:8025")), Site::Ok);
        assert_eq!(
            check(u, Some("http://127.0.0.1:8025"), Some("127.0.0.1:8025")),
            Site::Ok
        );
        // DNS rebinding: the attacker's name, its own origin.
        assert_eq!(
            check(u, Some("http://evil.test:8025"), Some("evil.test:8025")),
            Site::WrongHost
        );
        assert_eq!(check(u, None, None), Site::WrongHost);
        assert_eq!(
            check(u, Some("https://evil.test"), Some("admin.example.org")),
            Site::WrongOrigin
        );
        assert_eq!(
            check(
                u,
                Some("http://admin.example.org"),
                Some("admin.example.org")
            ),
            Site::WrongOrigin
        );
        assert_eq!(
            check(u, Some("http://evil.test"), Some("127.0.0.1:8025")),
            Site::WrongOrigin
        );
    }

    #[test]
    fn public_urls_parse() {
        for bad in [
            "admin.example.org",
            "ftp://admin.example.org",
            "https://admin.example.org/console",
            "https://user@admin.example.org",
            "https://admin.example.org:0",
            "https://admin.example.org:99999",
            "https://",
            "https://[::1",
        ] {
            assert!(PublicUrl::parse(bad).is_err(), "{bad}");
        }
        let u = PublicUrl::parse("http://[::1]:8025").unwrap();
        assert_eq!(u.origin(), "http://[::1]:8025");
        assert_eq!(
            PublicUrl::parse("https://a.example:443").unwrap().origin(),
            "https://a.example"
        );
    }
}
