//! Choosing a recovery point: `latest`, an id, or an unambiguous id prefix.

use coffre_vault_store::{PointRecord, Vault};

use crate::error::{EngineError, Result};

/// Shortest id prefix accepted.
pub const MIN_PREFIX: usize = 4;

/// Finds the point of `item` named by `selector` (`latest`, an id, or an
/// id prefix of at least four characters).
pub fn select_point(vault: &Vault, item: &str, selector: &str) -> Result<PointRecord> {
    if vault.item(item)?.is_none() {
        return Err(EngineError::ItemNotFound { item: item.into() });
    }
    let mut points = vault.points(item)?;
    if points.is_empty() {
        return Err(EngineError::NoPoints { item: item.into() });
    }
    if selector == "latest" {
        return points
            .pop()
            .ok_or_else(|| EngineError::NoPoints { item: item.into() });
    }
    if let Some(p) = points.iter().find(|p| p.id == selector) {
        return Ok(p.clone());
    }
    let not_found = || EngineError::PointNotFound {
        item: item.into(),
        point: selector.into(),
    };
    if selector.len() < MIN_PREFIX {
        return Err(not_found());
    }
    let mut matches = points.into_iter().filter(|p| p.id.starts_with(selector));
    match (matches.next(), matches.next()) {
        (Some(p), None) => Ok(p),
        (Some(_), Some(_)) => Err(EngineError::PointAmbiguous {
            item: item.into(),
            point: selector.into(),
        }),
        (None, _) => Err(not_found()),
    }
}
