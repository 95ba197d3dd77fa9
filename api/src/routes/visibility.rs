//! Tenant visibility: another tenant's record reads exactly like a missing one.

use sluice_core::domain::{Batch, FileMeta};

use crate::auth::Tenant;

/// A record that belongs to one tenant.
pub(crate) trait Owned {
    fn owner(&self) -> &str;
}

impl Owned for FileMeta {
    fn owner(&self) -> &str {
        self.tenant()
    }
}

impl Owned for Batch {
    fn owner(&self) -> &str {
        self.tenant.as_str()
    }
}

/// The record if it exists *and* belongs to `tenant`. Every read goes through here, so another
/// tenant's object is indistinguishable from a missing one (no id probing across tenants).
pub(crate) fn visible<T: Owned>(found: Option<T>, tenant: &Tenant) -> Option<T> {
    found.filter(|record| record.owner() == tenant.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_tenants_records_are_invisible() {
        let meta = |tenant: &str| {
            Some(FileMeta(
                [("tenant".to_owned(), tenant.to_owned())]
                    .into_iter()
                    .collect(),
            ))
        };
        let alice = Tenant("alice".into());
        assert!(visible(meta("alice"), &alice).is_some());
        assert!(visible(meta("bob"), &alice).is_none());
        assert!(visible(None::<FileMeta>, &alice).is_none());
    }
}
