//! The `"identity"` of a request body (`/v1/filter`, `/v1/spend`, `/v1/reserve`):
//! `{"key", "user", "team", "org", "customer"}`, each optional (absent or `null`), a string of
//! 1 to [`MAX_NAME_LEN`] bytes. A field of another name, or of another type, is refused with
//! its name; the length is checked by [`IdentityIn::check`].
//!
//! Parsed by hand rather than derived, so that every error names the field
//! (`identity.team`), and names without escapes are borrowed from the body.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;

use provider_budgets::{Identity, Scope};

/// Longest identity name accepted, in bytes (litellm's hashed keys are 64, ids are UUIDs; an
/// e-mail address as a user id fits too). A bound, so that a body cannot make a fingerprint
/// or a log line of any size out of one name.
pub(crate) const MAX_NAME_LEN: usize = 256;

/// A request's identity as received: one name per identity scope, in the order of
/// [`Scope::IDENTITY`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct IdentityIn<'a> {
    names: [Option<Cow<'a, str>>; 5],
}

impl IdentityIn<'_> {
    /// The library's identity, borrowing the names.
    pub(super) fn identity(&self) -> Identity<'_> {
        Scope::IDENTITY
            .into_iter()
            .zip(&self.names)
            .fold(Identity::new(), |id, (scope, name)| {
                id.with(scope, name.as_deref())
            })
    }

    /// Whether no name is given.
    pub(super) fn is_empty(&self) -> bool {
        self.names.iter().all(Option::is_none)
    }

    /// Refuses a name that is empty or longer than [`MAX_NAME_LEN`], naming its field.
    pub(super) fn check(&self) -> Result<(), String> {
        for (scope, name) in Scope::IDENTITY.into_iter().zip(&self.names) {
            if let Some(n) = name {
                if n.is_empty() || n.len() > MAX_NAME_LEN {
                    return Err(format!(
                        "identity.{scope}: must be 1 to {MAX_NAME_LEN} bytes, got {}",
                        n.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The same, owning its names (a validated spend outlives its body).
    pub(super) fn into_owned(self) -> IdentityIn<'static> {
        IdentityIn {
            names: self.names.map(|n| n.map(|n| Cow::Owned(n.into_owned()))),
        }
    }

    /// Appends the fingerprint encoding of the names to `out`: for each identity scope in
    /// order, `0` (absent) or `1`, the length (u64, big-endian) and the bytes.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        for name in &self.names {
            match name {
                None => out.push(0),
                Some(n) => {
                    out.push(1);
                    out.extend_from_slice(&(n.len() as u64).to_be_bytes());
                    out.extend_from_slice(n.as_bytes());
                }
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for IdentityIn<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IdentityIn<'a>, D::Error> {
        d.deserialize_map(Fields)
    }
}

/// The visitor of the identity object.
struct Fields;

impl<'de> Visitor<'de> for Fields {
    type Value = IdentityIn<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("identity: an object with the optional strings key, user, team, org, customer")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IdentityIn<'de>, A::Error> {
        let mut out = IdentityIn::default();
        while let Some(field) = map.next_key_seed(Name { field: None })? {
            let Some((i, scope)) = Scope::IDENTITY
                .into_iter()
                .enumerate()
                .find(|(_, s)| s.as_str() == field)
            else {
                return Err(A::Error::custom(format!(
                    "identity: unknown field {field:?} (key, user, team, org or customer)"
                )));
            };
            if out.names[i].is_some() {
                return Err(A::Error::custom(format!("identity.{scope}: given twice")));
            }
            out.names[i] = map.next_value_seed(Optional(Name { field: Some(scope) }))?;
        }
        Ok(out)
    }
}

/// A string, borrowed when the body has it without escapes; `field` names it in the error
/// for a value of another type.
#[derive(Clone, Copy)]
struct Name {
    field: Option<Scope>,
}

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(scope) => write!(f, "a string for identity.{scope}"),
            None => f.write_str("a field name"),
        }
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// A [`Name`] or `null`.
struct Optional(Name);

impl<'de> DeserializeSeed<'de> for Optional {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Optional {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<IdentityIn<'_>, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn fields_borrow_names_and_errors_name_the_field() {
        let id = parse(r#"{"team": "research", "key": "k1", "user": null}"#).unwrap();
        assert_eq!(id.identity(), Identity::new().key("k1").team("research"));
        assert!(matches!(id.names[2], Some(Cow::Borrowed(_))));
        assert!(parse("{}").unwrap().is_empty());
        let escaped = parse(r#"{"org": "a\u0062c"}"#).unwrap();
        assert_eq!(escaped.identity().get(Scope::Org), Some("abc"));
        for (json, want) in [
            (
                r#"{"group": "x"}"#,
                "identity: unknown field \"group\" (key, user, team, org or customer)",
            ),
            (
                r#"{"team": 5}"#,
                "invalid type: integer `5`, expected a string for identity.team",
            ),
            (r#"{"key": ["a"]}"#, "expected a string for identity.key"),
            (
                r#"{"user": "a", "user": "b"}"#,
                "identity.user: given twice",
            ),
            (r#""k1""#, "expected identity: an object"),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
        let long = format!(r#"{{"customer": "{}"}}"#, "x".repeat(MAX_NAME_LEN + 1));
        assert_eq!(
            parse(&long).unwrap().check(),
            Err(format!(
                "identity.customer: must be 1 to {MAX_NAME_LEN} bytes, got 257"
            ))
        );
        assert_eq!(
            parse(r#"{"team": ""}"#).unwrap().check(),
            Err(format!(
                "identity.team: must be 1 to {MAX_NAME_LEN} bytes, got 0"
            ))
        );
        let full = format!(r#"{{"customer": "{}"}}"#, "x".repeat(MAX_NAME_LEN));
        assert_eq!(parse(&full).unwrap().check(), Ok(()));
    }

    #[test]
    fn the_encoding_tells_every_identity_apart() {
        let enc = |json: &str| {
            let mut out = Vec::new();
            parse(json).unwrap().encode(&mut out);
            out
        };
        let all = [
            r#"{}"#,
            r#"{"key": "a"}"#,
            r#"{"user": "a"}"#,
            r#"{"key": "a", "user": "b"}"#,
            r#"{"key": "ab"}"#,
            r#"{"key": "a", "team": "b"}"#,
            r#"{"customer": "a"}"#,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(enc(a), enc(b), "{a} {b}");
            }
        }
        assert_eq!(enc(r#"{"team": "b", "key": "a"}"#), enc(all[5]));
    }
}
