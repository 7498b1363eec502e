//! Reads of the catalog the index holds (items, points, policies and the
//! record of pruned points), and the versioned JSON of its values.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::keys::{point_prefix, pruned_key};
use super::{Cf, Index};
use crate::error::Result;
use crate::format::catalog::{CATALOG_VALUE_VERSION, ItemRecord, PointRecord};
use crate::format::chunk_id::ChunkId;

pub(super) fn encode_catalog<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![CATALOG_VALUE_VERSION];
    // Serialising plain records into a Vec cannot fail.
    out.extend(serde_json::to_vec(v).unwrap_or_default());
    out
}

impl Index {
    /// The block-map root of point `seq` of `item` if retention pruned
    /// it (a value that is not a chunk id counts as no record).
    pub fn pruned_root(&self, item: &str, seq: u64) -> Result<Option<ChunkId>> {
        Ok(self
            .get(Cf::Meta, &pruned_key(item, seq))?
            .and_then(|v| ChunkId::from_slice(&v)))
    }

    fn decode_catalog<T: DeserializeOwned>(&self, what: &'static str, v: &[u8]) -> Result<T> {
        match v.split_first() {
            Some((&CATALOG_VALUE_VERSION, body)) => {
                serde_json::from_slice(body).map_err(|e| self.corrupt(what, e.to_string()))
            }
            Some((ver, _)) => Err(self.corrupt(what, format!("unknown value version {ver}"))),
            None => Err(self.corrupt(what, "empty value")),
        }
    }

    /// Every policy as a name and its JSON value.
    pub fn policy_values(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        self.scan(Cf::Policies, &[], |k, v| {
            let name = String::from_utf8_lossy(k).into_owned();
            out.push((name, self.decode_catalog("policy", v)?));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The item called `name`.
    pub fn item(&self, name: &str) -> Result<Option<ItemRecord>> {
        self.get(Cf::Items, name.as_bytes())?
            .map(|v| self.decode_catalog("item", &v))
            .transpose()
    }

    /// All items, by name.
    pub fn items(&self) -> Result<Vec<ItemRecord>> {
        let mut out = Vec::new();
        self.scan(Cf::Items, &[], |_, v| {
            out.push(self.decode_catalog("item", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Points of `item`, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointRecord>> {
        let mut out = Vec::new();
        self.scan(Cf::Points, &point_prefix(item), |_, v| {
            out.push(self.decode_catalog("point", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every point of every item.
    pub fn all_points(&self) -> Result<Vec<PointRecord>> {
        let mut out = Vec::new();
        self.scan(Cf::Points, &[], |_, v| {
            out.push(self.decode_catalog("point", v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// The policy called `name`, decoded as `T`.
    pub fn policy<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.get(Cf::Policies, name.as_bytes())?
            .map(|v| self.decode_catalog("policy", &v))
            .transpose()
    }

    /// All policies, by name.
    pub fn policies<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.scan(Cf::Policies, &[], |_, v| {
            out.push(self.decode_catalog("policy", v)?);
            Ok(true)
        })?;
        Ok(out)
    }
}
