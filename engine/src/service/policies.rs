//! The vault's policies: stored in the index's `policies` family, created
//! with the vault (`DefaultPolicy`), validated on every change, and never
//! deleted while an item is protected under them.

use coffre_vault_store::{IndexBatch, ItemRecord, Protection, Vault};

use crate::error::{EngineError, Result};
use crate::policy::{DEFAULT_POLICY, Policy};

/// Every policy, by name. A vault with no stored policy (written before
/// policies existed) has the built-in `DefaultPolicy`.
pub fn list(vault: &Vault) -> Result<Vec<Policy>> {
    let out: Vec<Policy> = vault.index().policies()?;
    if out.is_empty() {
        return Ok(vec![Policy::default_policy()]);
    }
    Ok(out)
}

fn default_missing_means_builtin(vault: &Vault) -> Result<bool> {
    Ok(vault.index().policies::<Policy>()?.is_empty())
}

/// The policy called `name`.
pub fn get(vault: &Vault, name: &str) -> Result<Policy> {
    match vault.index().policy::<Policy>(name)? {
        Some(p) => Ok(p),
        None if name == DEFAULT_POLICY && default_missing_means_builtin(vault)? => {
            Ok(Policy::default_policy())
        }
        None => Err(EngineError::PolicyNotFound { name: name.into() }),
    }
}

/// Name of the policy `item` is protected under (items written before
/// policies existed: `DefaultPolicy`).
pub fn name_of(item: &ItemRecord) -> &str {
    item.policy.as_deref().unwrap_or(DEFAULT_POLICY)
}

/// The policy `item` is protected under.
pub fn of_item(vault: &Vault, item: &ItemRecord) -> Result<Policy> {
    get(vault, name_of(item))
}

/// Creates a policy.
pub fn create(vault: &Vault, policy: &Policy) -> Result<()> {
    policy.validate()?;
    if get(vault, &policy.name).is_ok() {
        return Err(EngineError::PolicyExists {
            name: policy.name.clone(),
        });
    }
    let mut b = IndexBatch::default();
    if policy.name != DEFAULT_POLICY && default_missing_means_builtin(vault)? {
        // Materialise the built-in default so it stays listed.
        b.put_policy(DEFAULT_POLICY, &Policy::default_policy());
    }
    b.put_policy(&policy.name, policy);
    vault.commit_catalog(b, &[])?;
    Ok(())
}

/// Replaces an existing policy; existing points follow the new rules at
/// the next prune.
pub fn set(vault: &Vault, policy: &Policy) -> Result<()> {
    policy.validate()?;
    get(vault, &policy.name)?;
    let mut b = IndexBatch::default();
    b.put_policy(&policy.name, policy);
    vault.commit_catalog(b, &[])?;
    Ok(())
}

/// Names of the items protected under `name`.
pub fn users(vault: &Vault, name: &str) -> Result<Vec<String>> {
    Ok(vault
        .index()
        .items()?
        .into_iter()
        .filter(|i| i.protection == Protection::Protected && name_of(i) == name)
        .map(|i| i.name)
        .collect())
}

/// Deletes a policy no item is protected under.
pub fn delete(vault: &Vault, name: &str) -> Result<()> {
    get(vault, name)?;
    let users = users(vault, name)?;
    if !users.is_empty() {
        return Err(EngineError::PolicyInUse {
            name: name.into(),
            items: describe_items(&users),
        });
    }
    let mut b = IndexBatch::default();
    b.delete_policy(name);
    vault.commit_catalog(b, &[])?;
    Ok(())
}

/// "item a", "items a, b and 3 more".
pub fn describe_items(items: &[String]) -> String {
    match items {
        [one] => format!("item {one}"),
        _ if items.len() <= 3 => format!("items {}", items.join(", ")),
        _ => format!(
            "items {} and {} more",
            items.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            items.len() - 3
        ),
    }
}
