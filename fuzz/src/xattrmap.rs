//! The `--xattrmap` harness: any text must parse or be refused with an error naming a rule,
//! never panic. An accepted map must match names as its rules say, and its rules written out
//! again (with a separator none of their fields holds) must parse back to the same map.
//!
//! Input: the map text, then after a NUL byte the xattr names to match, NUL-separated.

use std::ffi::CString;

use berth_passthrough::xattr_map::{ClientName, Rule, RuleType, Scope, ServerName, XattrMapError};
use berth_passthrough::XattrMap;

const SEPARATORS: &[char] = &[
    ':', '/', '|', ',', ';', '#', '%', '@', '!', '~', '^', '§', '\u{1}',
];

fn write_rules(rules: &[Rule]) -> Option<String> {
    let mut text = String::new();
    for rule in rules {
        let key = std::str::from_utf8(&rule.key).ok()?;
        let prepend = std::str::from_utf8(&rule.prepend).ok()?;
        let sep = *SEPARATORS
            .iter()
            .find(|c| !key.contains(**c) && !prepend.contains(**c))?;
        let rule_type = match rule.rule_type {
            RuleType::Prefix => "prefix",
            RuleType::Ok => "ok",
            RuleType::Bad => "bad",
            RuleType::Unsupported => "unsupported",
        };
        let scope = match rule.scope {
            Scope::Client => "client",
            Scope::Server => "server",
            Scope::All => "all",
        };
        text.push_str(&format!(
            "{sep}{rule_type}{sep}{scope}{sep}{key}{sep}{prepend}{sep}\n"
        ));
    }
    Some(text)
}

/// What became of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The map text is not UTF-8 (a command line could not pass it).
    NotText,
    /// Refused with an error.
    Refused,
    /// Parsed, written back and matched against the input's names.
    Accepted,
}

/// Parses the input's map, checks what it accepts and matches the input's names; panics on
/// any broken property.
pub fn check(data: &[u8]) -> Outcome {
    let (text, names) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return Outcome::NotText;
    };
    let map = match XattrMap::parse(text) {
        Ok(map) => map,
        Err(XattrMapError::NoRules) => {
            assert!(text.trim().is_empty(), "{text:?} has text but no rules");
            return Outcome::Refused;
        }
        Err(e @ XattrMapError::BadRule { number, .. }) => {
            assert!(number >= 1);
            assert!(!e.to_string().is_empty());
            return Outcome::Refused;
        }
    };
    assert!(!map.rules().is_empty());
    if let Some(written) = write_rules(map.rules()) {
        let again = XattrMap::parse(&written)
            .unwrap_or_else(|e| panic!("{written:?} written from {text:?} does not parse: {e}"));
        assert_eq!(again, map, "{written:?}");
    }
    let (client_total, server_total) = map.is_terminated();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()).take(64) {
        let cname = CString::new(name).expect("split at NUL");
        match map.map_client(&cname) {
            ClientName::Host(host) => {
                let host = host.to_bytes();
                assert!(host.ends_with(name), "the guest name is kept at the end");
                let rule = map
                    .rules()
                    .iter()
                    .find(|r| r.scope != Scope::Server && name.starts_with(&r.key))
                    .expect("a rule matched");
                match rule.rule_type {
                    RuleType::Prefix => assert_eq!(&host[..rule.prepend.len()], &rule.prepend[..]),
                    RuleType::Ok => assert_eq!(host, name),
                    other => panic!("{other:?} passed a name"),
                }
            }
            ClientName::Unmatched => assert!(!client_total, "a catch-all rule exists"),
            ClientName::Denied | ClientName::Unsupported => {}
        }
        match map.map_server(name) {
            ServerName::Guest(guest) => {
                assert!(!guest.is_empty());
                assert!(name.ends_with(guest), "the host name is only stripped");
            }
            ServerName::Unmatched => assert!(!server_total, "a catch-all rule exists"),
            ServerName::Hidden => {}
        }
    }
    let _ = map.remapped_capability();
    Outcome::Accepted
}
