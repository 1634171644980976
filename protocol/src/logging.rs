//! The log directives both binaries put on top of the level an operator asks for.
//!
//! Some dependencies log whole payloads at debug and trace level: tungstenite logs every text
//! message it receives (an `assign` with its secrets), bollard every Docker request body (a step
//! container's configuration with its environment, secrets included), rustls and hyper the
//! traffic they handle. Both binaries cap these crates at `info`, whatever level is asked for,
//! so that `level = "trace"` while chasing a bug never writes a secret into the journal.
//!
//! Owns only string handling (no logging dependency): the binaries build their filters from
//! [`capped_directives`]. Must never let a directive for one of [`PAYLOAD_LOGGING_CRATES`]
//! through, whatever its form.

/// Crates whose debug or trace output can hold message payloads or container environments.
pub const PAYLOAD_LOGGING_CRATES: &[&str] = &[
    "bollard",
    "tungstenite",
    "tokio_tungstenite",
    "rustls",
    "tokio_rustls",
    "hyper",
    "hyper_util",
    "h2",
    "axum",
    "tower_http",
];

fn capped(target: &str) -> bool {
    PAYLOAD_LOGGING_CRATES.iter().any(|c| {
        target == *c
            || target
                .strip_prefix(c)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// `requested`, an env-filter directive list (`debug`, `info,delegate_agent=trace`, ...), with
/// every directive naming one of [`PAYLOAD_LOGGING_CRATES`] removed and each of them capped at
/// `info` instead.
pub fn capped_directives(requested: &str) -> String {
    let mut out: Vec<String> = requested
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            // A directive is `level`, `target`, `target=level` or `target[span{field}]=level`.
            let target = d.split(['=', '[']).next().unwrap_or("").trim();
            let is_level = matches!(
                target.to_ascii_lowercase().as_str(),
                "off" | "error" | "warn" | "info" | "debug" | "trace"
            ) && !d.contains('=');
            is_level || target.is_empty() || !capped(target)
        })
        .map(str::to_string)
        .collect();
    out.extend(PAYLOAD_LOGGING_CRATES.iter().map(|c| format!("{c}=info")));
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_is_kept_and_the_payload_crates_are_capped() {
        let d = capped_directives("trace");
        assert!(d.starts_with("trace,"), "{d}");
        for c in PAYLOAD_LOGGING_CRATES {
            assert!(d.contains(&format!(",{c}=info")), "{c} in {d}");
        }
    }

    #[test]
    fn directives_for_payload_crates_are_dropped_whatever_their_form() {
        let d = capped_directives(
            "info, bollard=trace,tungstenite::protocol=debug,hyper[conn]=trace,rustls,\
             delegate_agent=trace,bollardish=debug",
        );
        let parts: Vec<&str> = d.split(',').collect();
        assert!(parts.contains(&"info"));
        assert!(parts.contains(&"delegate_agent=trace"));
        // Only a crate of that exact name is capped, not one whose name starts the same.
        assert!(parts.contains(&"bollardish=debug"));
        for gone in [
            "bollard=trace",
            "tungstenite::protocol=debug",
            "hyper[conn]=trace",
            "rustls",
        ] {
            assert!(!parts.contains(&gone), "{gone} survived in {d}");
        }
        assert!(parts.contains(&"bollard=info") && parts.contains(&"rustls=info"));
    }

    #[test]
    fn empty_input_gives_only_the_caps() {
        assert_eq!(
            capped_directives(" , "),
            PAYLOAD_LOGGING_CRATES
                .iter()
                .map(|c| format!("{c}=info"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}
