//! Extended attribute name mapping: virtiofsd 1.14's `--xattrmap` rule language.
//!
//! A map is an ordered list of rules `:type:scope:key:prepend:`, where the separator is the
//! first non-space character of each rule (so every rule may use its own). Names from the
//! guest (SETXATTR, GETXATTR, REMOVEXATTR, security labels) are matched against `key`, names
//! from the host (LISTXATTR) against `prepend`; the first rule whose scope covers the direction
//! and whose string is a prefix of the name decides:
//!
//! | type | guest → host | host → guest |
//! | --- | --- | --- |
//! | `prefix` | `prepend` is put in front of the name | `prepend` is stripped |
//! | `ok` | passed unchanged | shown unchanged |
//! | `bad` | refused (EPERM; ENODATA for GETXATTR) | hidden |
//! | `unsupported` | refused with ENOTSUP | hidden |
//!
//! `:map:key:prepend:` is shorthand for the rules that prefix `key` names with `prepend`,
//! keep the guest away from the host's own `prepend` names and pass everything else (or, with
//! an empty `key`, refuse everything else); it must be the last rule.
//!
//! This module only parses and answers questions about names; the filesystem turns the
//! answers into errnos per operation.

use std::borrow::Cow;
use std::ffi::{CStr, CString};
use std::fmt;

/// What a rule does with the names it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleType {
    /// Prepend `prepend` to guest names, strip it from host names.
    Prefix,
    /// Pass the name unchanged.
    Ok,
    /// Refuse the guest's name with EPERM, hide the host's.
    Bad,
    /// Refuse the guest's name with ENOTSUP, hide the host's.
    Unsupported,
}

/// Which names a rule is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Names from the guest, matched against `key`.
    Client,
    /// Names from the host, matched against `prepend`.
    Server,
    /// Both.
    All,
}

impl Scope {
    fn client(self) -> bool {
        matches!(self, Scope::Client | Scope::All)
    }

    fn server(self) -> bool {
        matches!(self, Scope::Server | Scope::All)
    }
}

/// One rule, after `map` expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub rule_type: RuleType,
    pub scope: Scope,
    /// Prefix matched against guest names.
    pub key: Vec<u8>,
    /// Prefix matched against host names, and what `prefix` prepends or strips.
    pub prepend: Vec<u8>,
}

impl Rule {
    fn new(rule_type: RuleType, scope: Scope, key: &[u8], prepend: &[u8]) -> Rule {
        Rule {
            rule_type,
            scope,
            key: key.to_vec(),
            prepend: prepend.to_vec(),
        }
    }
}

/// What becomes of a name the guest sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientName<'a> {
    /// Use this name on the host.
    Host(Cow<'a, CStr>),
    /// A `bad` rule matched.
    Denied,
    /// An `unsupported` rule matched.
    Unsupported,
    /// No rule matched (the map has no catch-all for guest names).
    Unmatched,
}

/// What becomes of a name the host lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerName<'a> {
    /// Show the guest this name.
    Guest(&'a [u8]),
    /// Leave it out of the list.
    Hidden,
    /// No rule matched (the map has no catch-all for host names).
    Unmatched,
}

/// What is wrong with one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The type field is not one of the known types.
    UnknownType(String),
    /// The scope field is not one of the known scopes.
    UnknownScope(String),
    /// The text ended before the rule's last separator.
    Incomplete {
        separator: char,
        fields_found: usize,
        fields_expected: usize,
    },
    /// A field holds a NUL byte, which no xattr name can contain.
    NulInField,
    /// A `map` rule was followed by more rules.
    MapNotLast,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownType(got) => write!(
                f,
                "unknown type '{got}'; expected prefix, ok, bad, unsupported or map"
            ),
            Problem::UnknownScope(got) => {
                write!(f, "unknown scope '{got}'; expected client, server or all")
            }
            Problem::Incomplete {
                separator,
                fields_found,
                fields_expected,
            } => write!(
                f,
                "the rule ends after {fields_found} of its {fields_expected} fields; every \
                 field, the last one too, must be followed by the separator '{separator}'"
            ),
            Problem::NulInField => write!(f, "a field contains a NUL byte"),
            Problem::MapNotLast => write!(
                f,
                "a map rule must be the last rule (there may be only one), but more rules \
                 follow it"
            ),
        }
    }
}

/// Why an xattr map string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XattrMapError {
    /// The string holds no rule at all.
    #[error("the xattr map holds no rules")]
    NoRules,
    /// One rule is malformed.
    #[error("xattr map rule {number} `{text}`: {problem}")]
    BadRule {
        /// 1-based position of the rule in the string.
        number: usize,
        /// The rule as written (up to where parsing stopped for incomplete rules).
        text: String,
        problem: Problem,
    },
}

/// A parsed xattr name map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XattrMap {
    rules: Vec<Rule>,
}

/// Splits one rule into fields: the separator is its first character, and each field runs to
/// the next separator.
struct RuleScanner<'a> {
    rest: &'a str,
    separator: char,
    fields_found: usize,
}

impl<'a> RuleScanner<'a> {
    fn field(&mut self, fields_expected: usize) -> Result<&'a str, Problem> {
        match self.rest.find(self.separator) {
            Some(end) => {
                let field = &self.rest[..end];
                self.rest = &self.rest[end + self.separator.len_utf8()..];
                self.fields_found += 1;
                if field.contains('\0') {
                    return Err(Problem::NulInField);
                }
                Ok(field)
            }
            None => Err(Problem::Incomplete {
                separator: self.separator,
                fields_found: self.fields_found,
                fields_expected,
            }),
        }
    }
}

/// Parses one rule at the start of `input` (no leading whitespace); returns its rules (a
/// `map` expands to several), whether it was a `map`, and the text after it.
fn parse_rule(input: &str) -> Result<(Vec<Rule>, bool, &str), Problem> {
    let mut chars = input.chars();
    let separator = chars.next().expect("called with a non-empty rule");
    let mut scan = RuleScanner {
        rest: chars.as_str(),
        separator,
        fields_found: 0,
    };
    let rule_type = scan.field(4)?;
    let rule_type = match rule_type {
        "prefix" => RuleType::Prefix,
        "ok" => RuleType::Ok,
        "bad" => RuleType::Bad,
        "unsupported" => RuleType::Unsupported,
        "map" => {
            let key = scan.field(3)?.as_bytes();
            let prepend = scan.field(3)?.as_bytes();
            return Ok((expand_map(key, prepend), true, scan.rest));
        }
        other => return Err(Problem::UnknownType(other.to_owned())),
    };
    let scope = match scan.field(4)? {
        "client" => Scope::Client,
        "server" => Scope::Server,
        "all" => Scope::All,
        other => return Err(Problem::UnknownScope(other.to_owned())),
    };
    let key = scan.field(4)?.as_bytes();
    let prepend = scan.field(4)?.as_bytes();
    Ok((
        vec![Rule::new(rule_type, scope, key, prepend)],
        false,
        scan.rest,
    ))
}

/// The rules `:map:key:prepend:` stands for (as virtiofsd expands it).
fn expand_map(key: &[u8], prepend: &[u8]) -> Vec<Rule> {
    let mut rules = vec![Rule::new(RuleType::Prefix, Scope::All, key, prepend)];
    if key.is_empty() {
        // Everything is prefixed; unprefixed host names are hidden.
        rules.push(Rule::new(RuleType::Bad, Scope::All, b"", b""));
    } else {
        // The guest may not reach the host's prefixed names directly, the host's own `key`
        // names stay hidden, and everything else passes.
        rules.push(Rule::new(RuleType::Bad, Scope::All, prepend, key));
        rules.push(Rule::new(RuleType::Ok, Scope::All, b"", b""));
    }
    rules
}

/// At most this many characters of a bad rule are quoted in its error.
const QUOTED_RULE_MAX: usize = 120;

fn quote(text: &str) -> String {
    let text = text.trim_end();
    match text.char_indices().nth(QUOTED_RULE_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

impl XattrMap {
    /// Parses a map as `--xattrmap` takes it.
    pub fn parse(input: &str) -> Result<XattrMap, XattrMapError> {
        let mut rules = Vec::new();
        let mut rest = input.trim_start();
        let mut number = 0;
        while !rest.is_empty() {
            number += 1;
            let bad = |problem, text: &str| XattrMapError::BadRule {
                number,
                text: quote(text),
                problem,
            };
            let (parsed, is_map, after) = parse_rule(rest).map_err(|p| bad(p, rest))?;
            rules.extend(parsed);
            let after = after.trim_start();
            if is_map && !after.is_empty() {
                let text = &rest[..rest.len() - after.len()];
                return Err(bad(Problem::MapNotLast, text));
            }
            rest = after;
        }
        if rules.is_empty() {
            return Err(XattrMapError::NoRules);
        }
        Ok(XattrMap { rules })
    }

    /// The rules in the order they are tried, `map` expanded.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The host name for a name the guest sends, or why there is none.
    pub fn map_client<'a>(&self, name: &'a CStr) -> ClientName<'a> {
        let bytes = name.to_bytes();
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.scope.client() && bytes.starts_with(&r.key))
        else {
            return ClientName::Unmatched;
        };
        match rule.rule_type {
            RuleType::Ok => ClientName::Host(Cow::Borrowed(name)),
            RuleType::Bad => ClientName::Denied,
            RuleType::Unsupported => ClientName::Unsupported,
            RuleType::Prefix => {
                let mut host = Vec::with_capacity(rule.prepend.len() + bytes.len() + 1);
                host.extend_from_slice(&rule.prepend);
                host.extend_from_slice(bytes);
                // Neither part holds a NUL: the name is a C string, the rule was checked.
                match CString::new(host) {
                    Ok(host) => ClientName::Host(Cow::Owned(host)),
                    Err(_) => ClientName::Denied,
                }
            }
        }
    }

    /// The name the guest sees for a name the host lists, or whether it is hidden.
    pub fn map_server<'a>(&self, name: &'a [u8]) -> ServerName<'a> {
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.scope.server() && name.starts_with(&r.prepend))
        else {
            return ServerName::Unmatched;
        };
        match rule.rule_type {
            RuleType::Ok => ServerName::Guest(name),
            RuleType::Bad | RuleType::Unsupported => ServerName::Hidden,
            // Stripping the whole name would list an empty one: hide it instead.
            RuleType::Prefix => match &name[rule.prepend.len()..] {
                [] => ServerName::Hidden,
                stripped => ServerName::Guest(stripped),
            },
        }
    }

    /// Whether some rule matches every guest name and some rule every host name: without
    /// them, a name no rule matches is refused or hidden.
    pub fn is_terminated(&self) -> (bool, bool) {
        let client = self
            .rules
            .iter()
            .any(|r| r.scope.client() && r.key.is_empty());
        let server = self
            .rules
            .iter()
            .any(|r| r.scope.server() && r.prepend.is_empty());
        (client, server)
    }

    /// The host name `security.capability` is stored under, when the map renames it: the
    /// host kernel then no longer drops file capabilities on write, truncation and chown by
    /// itself, so the filesystem must.
    pub fn remapped_capability(&self) -> Option<CString> {
        match self.map_client(c"security.capability") {
            ClientName::Host(name) if name.to_bytes() != b"security.capability" => {
                Some(name.into_owned())
            }
            _ => None,
        }
    }
}

impl std::str::FromStr for XattrMap {
    type Err = XattrMapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        XattrMap::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use RuleType::{Bad, Ok as Pass, Prefix, Unsupported};
    use Scope::{All, Client, Server};

    fn rule(rule_type: RuleType, scope: Scope, key: &str, prepend: &str) -> Rule {
        Rule::new(rule_type, scope, key.as_bytes(), prepend.as_bytes())
    }

    fn parse(input: &str) -> XattrMap {
        XattrMap::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"))
    }

    fn client(map: &XattrMap, name: &str) -> Result<String, &'static str> {
        let name = CString::new(name).unwrap();
        match map.map_client(&name) {
            ClientName::Host(host) => Ok(host.to_str().unwrap().to_owned()),
            ClientName::Denied => Err("denied"),
            ClientName::Unsupported => Err("unsupported"),
            ClientName::Unmatched => Err("unmatched"),
        }
    }

    fn server(map: &XattrMap, name: &str) -> Result<String, &'static str> {
        match map.map_server(name.as_bytes()) {
            ServerName::Guest(guest) => Ok(String::from_utf8(guest.to_vec()).unwrap()),
            ServerName::Hidden => Err("hidden"),
            ServerName::Unmatched => Err("unmatched"),
        }
    }

    fn problem(input: &str) -> (usize, String, Problem) {
        match XattrMap::parse(input) {
            Err(XattrMapError::BadRule {
                number,
                text,
                problem,
            }) => (number, text, problem),
            other => panic!("{input:?} should be a bad rule, got {other:?}"),
        }
    }

    // ----- the rule table of virtiofsd's doc/xattr-mapping.md -----

    #[test]
    fn doc_prefix_client_trusted() {
        let map = parse(":prefix:client:trusted.:user.virtiofs.:");
        assert_eq!(
            map.rules(),
            [rule(Prefix, Client, "trusted.", "user.virtiofs.")]
        );
        assert_eq!(
            client(&map, "trusted.overlay.opaque"),
            Ok("user.virtiofs.trusted.overlay.opaque".into())
        );
        assert_eq!(client(&map, "user.x"), Err("unmatched"));
        // A client-only rule does not touch listings.
        assert_eq!(server(&map, "user.virtiofs.trusted.x"), Err("unmatched"));
    }

    #[test]
    fn doc_prefix_server_strips() {
        let map = parse(":prefix:server::user.virtiofs.:");
        assert_eq!(
            server(&map, "user.virtiofs.security.selinux"),
            Ok("security.selinux".into())
        );
        assert_eq!(server(&map, "user.other"), Err("unmatched"));
        assert_eq!(client(&map, "user.x"), Err("unmatched"));
    }

    #[test]
    fn doc_prefix_all_combines_both() {
        let map = parse(":prefix:all:trusted.:user.virtiofs.:");
        assert_eq!(
            client(&map, "trusted.a"),
            Ok("user.virtiofs.trusted.a".into())
        );
        assert_eq!(
            server(&map, "user.virtiofs.trusted.a"),
            Ok("trusted.a".into())
        );
    }

    #[test]
    fn doc_ok_client_user() {
        let map = parse(":ok:client:user.::");
        assert_eq!(client(&map, "user.mime_type"), Ok("user.mime_type".into()));
        assert_eq!(client(&map, "trusted.x"), Err("unmatched"));
        assert_eq!(server(&map, "user.mime_type"), Err("unmatched"));
    }

    #[test]
    fn doc_ok_server_security() {
        let map = parse(":ok:server::security.:");
        assert_eq!(
            server(&map, "security.selinux"),
            Ok("security.selinux".into())
        );
        assert_eq!(server(&map, "user.x"), Err("unmatched"));
    }

    #[test]
    fn doc_ok_all_terminates() {
        let map = parse(":ok:all:::");
        assert_eq!(
            client(&map, "anything.at.all"),
            Ok("anything.at.all".into())
        );
        assert_eq!(server(&map, "trusted.x"), Ok("trusted.x".into()));
        assert_eq!(map.is_terminated(), (true, true));
    }

    #[test]
    fn doc_bad_server_security_hides() {
        let map = parse(":bad:server::security.:");
        assert_eq!(server(&map, "security.selinux"), Err("hidden"));
        assert_eq!(client(&map, "security.selinux"), Err("unmatched"));
    }

    // ----- the mapping examples of the same document -----

    #[test]
    fn doc_example_1_prefix_everything() {
        let map = parse(":prefix:all::user.virtiofs.::bad:all:::");
        assert_eq!(
            map.rules(),
            [
                rule(Prefix, All, "", "user.virtiofs."),
                rule(Bad, All, "", ""),
            ]
        );
        assert_eq!(
            client(&map, "user.foo"),
            Ok("user.virtiofs.user.foo".into())
        );
        assert_eq!(
            client(&map, "security.selinux"),
            Ok("user.virtiofs.security.selinux".into())
        );
        assert_eq!(
            client(&map, "system.posix_acl_access"),
            Ok("user.virtiofs.system.posix_acl_access".into())
        );
        assert_eq!(
            server(&map, "user.virtiofs.user.foo"),
            Ok("user.foo".into())
        );
        // What the host set itself stays hidden.
        assert_eq!(server(&map, "user.foo"), Err("hidden"));
        assert_eq!(server(&map, "security.selinux"), Err("hidden"));
        // Nothing is left to the bad rule on the client side: the first rule takes all.
        assert_eq!(map.is_terminated(), (true, true));
        // And it equals the map shorthand.
        assert_eq!(map, parse(":map::user.virtiofs.:"));
    }

    #[test]
    fn doc_example_2_prefix_trusted_allow_others() {
        let text = "/prefix/all/trusted./user.virtiofs./
            /bad/server//trusted./
            /bad/client/user.virtiofs.//
            /ok/all///";
        let map = parse(text);
        assert_eq!(
            map.rules(),
            [
                rule(Prefix, All, "trusted.", "user.virtiofs."),
                rule(Bad, Server, "", "trusted."),
                rule(Bad, Client, "user.virtiofs.", ""),
                rule(Pass, All, "", ""),
            ]
        );
        assert_eq!(
            client(&map, "trusted.overlay.origin"),
            Ok("user.virtiofs.trusted.overlay.origin".into())
        );
        assert_eq!(client(&map, "user.virtiofs.trusted.x"), Err("denied"));
        assert_eq!(client(&map, "user.plain"), Ok("user.plain".into()));
        assert_eq!(
            server(&map, "user.virtiofs.trusted.overlay.origin"),
            Ok("trusted.overlay.origin".into())
        );
        assert_eq!(server(&map, "trusted.host_only"), Err("hidden"));
        assert_eq!(server(&map, "user.plain"), Ok("user.plain".into()));
        // The map shorthand means the same for every name (its bad rule is one `all` rule
        // where the example has a server and a client rule).
        let short = parse("/map/trusted./user.virtiofs./");
        assert_eq!(
            short.rules(),
            [
                rule(Prefix, All, "trusted.", "user.virtiofs."),
                rule(Bad, All, "user.virtiofs.", "trusted."),
                rule(Pass, All, "", ""),
            ]
        );
        for name in [
            "trusted.a",
            "user.virtiofs.trusted.a",
            "user.virtiofs.x",
            "user.a",
            "security.selinux",
            "trusted.",
        ] {
            assert_eq!(client(&map, name), client(&short, name), "client {name}");
            assert_eq!(server(&map, name), server(&short, name), "server {name}");
        }
    }

    #[test]
    fn doc_example_3_hide_security() {
        let map = parse("/bad/all/security./security./\n            /ok/all///");
        assert_eq!(client(&map, "security.selinux"), Err("denied"));
        assert_eq!(server(&map, "security.selinux"), Err("hidden"));
        assert_eq!(client(&map, "user.a"), Ok("user.a".into()));
        assert_eq!(server(&map, "trusted.a"), Ok("trusted.a".into()));
    }

    #[test]
    fn doc_posix_acl_map() {
        let map = parse(":map::user.virtiofs.:");
        assert_eq!(
            client(&map, "system.posix_acl_default"),
            Ok("user.virtiofs.system.posix_acl_default".into())
        );
        assert_eq!(
            server(&map, "user.virtiofs.system.posix_acl_default"),
            Ok("system.posix_acl_default".into())
        );
        assert_eq!(server(&map, "system.posix_acl_access"), Err("hidden"));
    }

    #[test]
    fn unsupported_selinux_example_from_virtiofsd() {
        // The rule virtiofsd's `unsupported` type was added for.
        let map = parse("/unsupported/all/security.selinux/security.selinux//ok/all///");
        assert_eq!(
            map.rules()[0],
            rule(Unsupported, All, "security.selinux", "security.selinux")
        );
        assert_eq!(client(&map, "security.selinux"), Err("unsupported"));
        assert_eq!(server(&map, "security.selinux"), Err("hidden"));
        assert_eq!(client(&map, "security.ima"), Ok("security.ima".into()));
        assert_eq!(server(&map, "user.a"), Ok("user.a".into()));
    }

    // ----- syntax -----

    #[test]
    fn every_rule_has_its_own_separator() {
        let map =
            parse(":prefix:all:trusted.:user.virtiofs.: /prefix/all/trusted./user.virtiofs./");
        assert_eq!(map.rules().len(), 2);
        assert_eq!(map.rules()[0], map.rules()[1]);
        // Separators may be any character, multibyte ones too, and fields may hold the other
        // rules' separators.
        let map = parse("§ok§client§a:b/c§§  |bad|all|||");
        assert_eq!(
            map.rules(),
            [rule(Pass, Client, "a:b/c", ""), rule(Bad, All, "", "")]
        );
        assert_eq!(client(&map, "a:b/c.d"), Ok("a:b/c.d".into()));
    }

    #[test]
    fn whitespace_around_and_between_rules() {
        let map = parse("\n\t  :ok:client:user.::\n\n   :bad:all:::   \n");
        assert_eq!(
            map.rules(),
            [rule(Pass, Client, "user.", ""), rule(Bad, All, "", "")]
        );
        // Rules may also follow each other directly.
        assert_eq!(parse(":ok:client:user.:::bad:all:::"), map);
    }

    #[test]
    fn fields_are_taken_verbatim() {
        // Spaces inside a rule belong to the field.
        let map = parse(":prefix:all: user.: x.:");
        assert_eq!(map.rules(), [rule(Prefix, All, " user.", " x.")]);
    }

    #[test]
    fn empty_maps_are_refused() {
        assert_eq!(XattrMap::parse(""), Err(XattrMapError::NoRules));
        assert_eq!(XattrMap::parse(" \n\t "), Err(XattrMapError::NoRules));
    }

    #[test]
    fn unknown_types_and_scopes_name_the_rule() {
        let (number, text, p) = problem(":ok:all::: :TOMATOPIRATE:all:::");
        assert_eq!(number, 2);
        assert_eq!(text, ":TOMATOPIRATE:all:::");
        assert_eq!(p, Problem::UnknownType("TOMATOPIRATE".into()));
        let (number, _, p) = problem("/prefix/helloworld///");
        assert_eq!(number, 1);
        assert_eq!(p, Problem::UnknownScope("helloworld".into()));
        // Types and scopes are case-sensitive, as in virtiofsd.
        assert_eq!(problem(":OK:all:::").2, Problem::UnknownType("OK".into()));
        assert_eq!(problem(":ok:ALL:::").2, Problem::UnknownScope("ALL".into()));
    }

    #[test]
    fn incomplete_rules_say_how_far_they_got() {
        let (number, text, p) = problem(":prefix:client:hi");
        assert_eq!((number, text.as_str()), (1, ":prefix:client:hi"));
        assert_eq!(
            p,
            Problem::Incomplete {
                separator: ':',
                fields_found: 2,
                fields_expected: 4
            }
        );
        // The closing separator is required.
        assert!(matches!(
            problem(":prefix:all:trusted.:user.vm.").2,
            Problem::Incomplete {
                fields_found: 3,
                ..
            }
        ));
        assert!(matches!(
            problem(":").2,
            Problem::Incomplete {
                fields_found: 0,
                ..
            }
        ));
        assert!(matches!(
            problem(":map:a").2,
            Problem::Incomplete {
                fields_found: 1,
                fields_expected: 3,
                ..
            }
        ));
        // The message names the separator that was missing.
        let message = XattrMap::parse(":ok:all:::\n/ok/all//")
            .unwrap_err()
            .to_string();
        assert!(message.contains("rule 2"), "{message}");
        assert!(message.contains("'/'"), "{message}");
        assert!(message.contains("/ok/all//"), "{message}");
    }

    #[test]
    fn a_rule_with_too_many_fields_runs_into_the_next() {
        // virtiofsd reads the fifth field as the next rule's separator: here `x`, whose rule
        // is then incomplete.
        let (number, _, p) = problem(":ok:all:::x:");
        assert_eq!(number, 2);
        assert!(matches!(p, Problem::Incomplete { separator: 'x', .. }));
    }

    #[test]
    fn map_must_be_the_only_last_rule() {
        let (number, text, p) =
            problem(":map:trusted.:virtiofs.user.::map:trusted.:virtiofs.user.:");
        assert_eq!(number, 1);
        assert_eq!(text, ":map:trusted.:virtiofs.user.:");
        assert_eq!(p, Problem::MapNotLast);
        assert_eq!(
            problem(":map::user.virtiofs.:\n:ok:all:::").2,
            Problem::MapNotLast
        );
        // Rules before it are fine, and so is whitespace after it.
        let map = parse(":bad:client:user.virtiofs.secret.:: :map::user.virtiofs.:\n  ");
        assert_eq!(map.rules().len(), 3);
        assert_eq!(client(&map, "user.virtiofs.secret.x"), Err("denied"));
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert_eq!(problem(":ok:all:a\0b::").2, Problem::NulInField);
    }

    #[test]
    fn long_rules_are_quoted_shortened() {
        let long = format!(":prefix:all:{}", "k".repeat(500));
        let (_, text, _) = problem(&long);
        assert!(text.chars().count() <= QUOTED_RULE_MAX + 1, "{text}");
        assert!(text.ends_with('…'));
    }

    // ----- matching -----

    #[test]
    fn the_first_matching_rule_wins() {
        let map = parse(":bad:all:user.secret.:user.secret.: :prefix:all:user.:host.: :ok:all:::");
        assert_eq!(client(&map, "user.secret.x"), Err("denied"));
        assert_eq!(client(&map, "user.x"), Ok("host.user.x".into()));
        assert_eq!(client(&map, "trusted.x"), Ok("trusted.x".into()));
        assert_eq!(server(&map, "user.secret.x"), Err("hidden"));
        assert_eq!(server(&map, "host.user.x"), Ok("user.x".into()));
    }

    #[test]
    fn client_rules_match_key_and_server_rules_match_prepend() {
        let map = parse(":prefix:client:a.:b.: :prefix:server:x.:y.:");
        assert_eq!(client(&map, "a.1"), Ok("b.a.1".into()));
        assert_eq!(client(&map, "x.1"), Err("unmatched"));
        assert_eq!(server(&map, "y.1"), Ok("1".into()));
        assert_eq!(server(&map, "b.a.1"), Err("unmatched"));
    }

    #[test]
    fn stripping_a_whole_name_hides_it() {
        let map = parse(":map::user.virtiofs.:");
        assert_eq!(server(&map, "user.virtiofs."), Err("hidden"));
    }

    #[test]
    fn unterminated_maps_are_reported() {
        assert_eq!(
            parse(":prefix:client:trusted.:user.virtiofs.:").is_terminated(),
            (false, false)
        );
        assert_eq!(parse(":ok:client:::").is_terminated(), (true, false));
        assert_eq!(parse(":bad:server:::").is_terminated(), (false, true));
    }

    #[test]
    fn a_renamed_capability_is_known() {
        assert_eq!(
            parse(":map::user.virtiofs.:").remapped_capability(),
            Some(CString::new("user.virtiofs.security.capability").unwrap())
        );
        assert_eq!(parse(":ok:all:::").remapped_capability(), None);
        assert_eq!(
            parse("/map/trusted./user.virtiofs./").remapped_capability(),
            None
        );
        assert_eq!(parse(":bad:all:::").remapped_capability(), None);
    }

    #[test]
    fn error_messages_read_as_sentences() {
        let message = XattrMap::parse(":prefix:everywhere:::")
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "xattr map rule 1 `:prefix:everywhere:::`: unknown scope 'everywhere'; expected \
             client, server or all"
        );
        assert_eq!(
            XattrMap::parse("").unwrap_err().to_string(),
            "the xattr map holds no rules"
        );
    }
}
