//! Who a request is made for: [`Identity`], the API key, user, team, organisation and customer
//! a router knows for it. Each name given selects the budgets of its identity scope
//! ([`Scope::IDENTITY`]); a name without budget selects none, like a tag without budget.

use std::fmt;

use crate::model::budget::Scope;

/// The identities of one request, every one optional: `Identity::new().key(hash).team("research")`.
///
/// Borrowed names, `Copy`, nothing allocated: an absent identity costs the request path a
/// check of five `None`s. Every budget of every name given applies to the request, together
/// with its deployment's and its tags' budgets: a request passes only if every one has room,
/// and its spend counts in every one. A key's spend counts toward its team's and its org's
/// budgets when the caller names them too (the limiter does not know which key belongs to
/// which team).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Identity<'a> {
    /// One name per identity scope, in the order of [`Scope::IDENTITY`].
    names: [Option<&'a str>; 5],
    /// Bit `i` set when `names[i]` is given: [`Identity::is_empty`], asked on every request,
    /// is one compare.
    given: u8,
}

impl<'a> Identity<'a> {
    /// No identity: no identity budget applies.
    pub const NONE: Identity<'static> = Identity {
        names: [None; 5],
        given: 0,
    };

    /// No identity yet (add names with the builder methods).
    pub const fn new() -> Identity<'a> {
        Identity {
            names: [None; 5],
            given: 0,
        }
    }

    /// The API key (litellm's hashed virtual key, `user_api_key_hash`).
    pub const fn key(self, key: &'a str) -> Identity<'a> {
        self.with_index(0, key)
    }

    /// The user (`user_api_key_user_id`).
    pub const fn user(self, user: &'a str) -> Identity<'a> {
        self.with_index(1, user)
    }

    /// The team (`user_api_key_team_id`).
    pub const fn team(self, team: &'a str) -> Identity<'a> {
        self.with_index(2, team)
    }

    /// The organisation (`user_api_key_org_id`).
    pub const fn org(self, org: &'a str) -> Identity<'a> {
        self.with_index(3, org)
    }

    /// The customer, litellm's end user (`user_api_key_end_user_id`).
    pub const fn customer(self, customer: &'a str) -> Identity<'a> {
        self.with_index(4, customer)
    }

    /// The name of `scope` set to `name` (`None` clears it); a scope that is not an identity
    /// scope is ignored. For code that maps scopes generically (a command line, a JSON body).
    pub fn with(mut self, scope: Scope, name: Option<&'a str>) -> Identity<'a> {
        if let Some(i) = scope.identity_index() {
            self.names[i] = name;
            match name {
                Some(_) => self.given |= 1 << i,
                None => self.given &= !(1 << i),
            }
        }
        self
    }

    const fn with_index(mut self, i: usize, name: &'a str) -> Identity<'a> {
        self.names[i] = Some(name);
        self.given |= 1 << i;
        self
    }

    /// The name given for `scope` (`None` for a scope that is not an identity scope).
    pub fn get(&self, scope: Scope) -> Option<&'a str> {
        scope.identity_index().and_then(|i| self.names[i])
    }

    /// Whether no name is given.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.given == 0
    }

    /// Each name given, with its scope, in the order of [`Scope::IDENTITY`].
    pub fn iter(&self) -> impl Iterator<Item = (Scope, &'a str)> + '_ {
        // By reference: the iterator stays two pointers wide (a copy of the names would be
        // 80 bytes moved with every iterator built from it).
        Scope::IDENTITY
            .iter()
            .zip(&self.names)
            .filter_map(|(scope, name)| Some((*scope, (*name)?)))
    }
}

impl fmt::Debug for Identity<'_> {
    /// The names given only: `Identity { key: "…", team: "research" }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Identity");
        for (scope, name) in self.iter() {
            s.field(scope.as_str(), &name);
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_get_and_iter_agree() {
        let id = Identity::new().team("research").key("k1").customer("acme");
        assert_eq!(id.get(Scope::Key), Some("k1"));
        assert_eq!(id.get(Scope::Team), Some("research"));
        assert_eq!(id.get(Scope::User), None);
        assert_eq!(id.get(Scope::Tag), None);
        assert_eq!(
            id.iter().collect::<Vec<_>>(),
            [
                (Scope::Key, "k1"),
                (Scope::Team, "research"),
                (Scope::Customer, "acme")
            ]
        );
        assert!(!id.is_empty() && Identity::NONE.is_empty() && Identity::new().is_empty());
        assert_eq!(
            id.with(Scope::Key, None)
                .with(Scope::Org, Some("o"))
                .get(Scope::Org),
            Some("o")
        );
        assert_eq!(
            id.with(Scope::Model, Some("x")),
            id,
            "not an identity scope"
        );
        assert!(Identity::new().key("k").with(Scope::Key, None).is_empty());
        assert_eq!(
            Identity::new().with(Scope::Key, Some("k")),
            Identity::new().key("k")
        );
        assert_eq!(
            format!("{:?}", Identity::new().user("u")),
            "Identity { user: \"u\" }"
        );
        for (i, scope) in Scope::IDENTITY.into_iter().enumerate() {
            let one = Identity::new().with(scope, Some("n"));
            assert_eq!(one.iter().collect::<Vec<_>>(), [(scope, "n")]);
            let by_method = [
                Identity::new().key("n"),
                Identity::new().user("n"),
                Identity::new().team("n"),
                Identity::new().org("n"),
                Identity::new().customer("n"),
            ];
            assert_eq!(by_method[i], one);
        }
    }
}
