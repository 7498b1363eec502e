//! The recovery text: a vault's master key written out to keep on paper
//! (`coffre key export`), and read back (`coffre key import`).
//!
//! ```text
//! coffre recovery key v1 for vault 0123456789abcdef
//! 3f2a 91c0 7d4e 0b18 c6a2 5e77 01f9 d3b4
//! 88e1 2c05 6a9f 4d30 e7b2 19c8 a054 7f6e
//! 5b21 90cd
//! ```
//!
//! Seventy-two hex digits in groups of four: the 32-byte key, then 4 bytes
//! of `BLAKE3-derive_key("coffre 2026-12-06 recovery check v1", key)`, so a
//! digit copied wrong is caught before the key is tried. Reading accepts
//! any case, spacing and line breaks, ignores the first line when it is the
//! header, and refuses anything else.

use zeroize::Zeroizing;

use super::CryptoError;
use super::keys::{KEY_LEN, MasterKey};

/// Context of the check bytes. Frozen.
pub const CHECK_CONTEXT: &str = "coffre 2026-12-06 recovery check v1";
/// The first words of the header line.
pub const HEADER: &str = "coffre recovery key v1";
/// Longest recovery text read.
pub const MAX_TEXT: usize = 4096;

const CHECK_LEN: usize = 4;

fn check_bytes(key: &[u8; KEY_LEN]) -> [u8; CHECK_LEN] {
    let d = blake3::derive_key(CHECK_CONTEXT, key);
    let mut c = [0u8; CHECK_LEN];
    c.copy_from_slice(d.get(..CHECK_LEN).unwrap_or(&[0; CHECK_LEN]));
    c
}

/// The recovery text of `key` for the vault `vault_id`.
pub fn export(key: &MasterKey, vault_id: &str) -> Zeroizing<String> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN + CHECK_LEN));
    bytes.extend_from_slice(key.expose());
    bytes.extend_from_slice(&check_bytes(key.expose()));
    let digits = Zeroizing::new(hex::encode(&bytes[..]));
    let mut out = Zeroizing::new(format!("{HEADER} for vault {vault_id}\n"));
    for (i, group) in digits.as_bytes().chunks(4).enumerate() {
        out.push_str(std::str::from_utf8(group).unwrap_or_default());
        out.push(if i % 8 == 7 { '\n' } else { ' ' });
    }
    if out.ends_with(' ') {
        out.pop();
        out.push('\n');
    }
    out
}

/// The master key a recovery text holds.
pub fn import(text: &str) -> Result<MasterKey, CryptoError> {
    let bad = |reason: String| CryptoError::Malformed {
        what: "the recovery text".into(),
        reason,
    };
    if text.len() > MAX_TEXT {
        return Err(bad(format!("longer than {MAX_TEXT} bytes")));
    }
    let mut lines = text.lines().peekable();
    if lines
        .peek()
        .is_some_and(|l| l.trim_start().starts_with(HEADER))
    {
        lines.next();
    }
    let mut digits = Zeroizing::new(String::with_capacity(2 * (KEY_LEN + CHECK_LEN)));
    for line in lines {
        for c in line.chars() {
            if c.is_ascii_hexdigit() {
                digits.push(c.to_ascii_lowercase());
            } else if !c.is_whitespace() && c != '-' {
                return Err(bad(format!(
                    "holds {c:?}: only hex digits, spaces and line breaks belong to the key"
                )));
            }
        }
    }
    if digits.len() != 2 * (KEY_LEN + CHECK_LEN) {
        return Err(bad(format!(
            "{} hex digits, not {}: a group is missing or doubled",
            digits.len(),
            2 * (KEY_LEN + CHECK_LEN)
        )));
    }
    let bytes = Zeroizing::new(hex::decode(digits.as_bytes()).map_err(|e| bad(e.to_string()))?);
    let (key, check) = bytes.split_at(KEY_LEN);
    let key: [u8; KEY_LEN] = key.try_into().map_err(|_| bad("no key".into()))?;
    if check != check_bytes(&key) {
        return Err(bad(
            "its check digits do not match: a digit was copied wrong".into(),
        ));
    }
    Ok(MasterKey::from_bytes(key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_through_its_text_and_a_wrong_digit_is_caught() {
        let key = MasterKey::generate().unwrap();
        let text = export(&key, "0123456789abcdef");
        assert!(text.starts_with("coffre recovery key v1 for vault 0123456789abcdef\n"));
        assert_eq!(text.lines().count(), 4, "{}", &*text);
        assert_eq!(import(&text).unwrap().expose(), key.expose());
        // Upper case, other spacing, no header.
        let body: String = text.lines().skip(1).collect::<Vec<_>>().join("  \n");
        assert_eq!(import(&body.to_uppercase()).unwrap().expose(), key.expose());
        // One digit changed.
        let mut chars: Vec<char> = body.chars().collect();
        chars[0] = if chars[0] == '0' { '1' } else { '0' };
        let wrong: String = chars.into_iter().collect();
        let e = import(&wrong).unwrap_err().to_string();
        assert!(e.contains("copied wrong"), "{e}");
        // A missing group.
        assert!(
            import(&body[5..])
                .unwrap_err()
                .to_string()
                .contains("hex digits")
        );
        assert!(import("coffre recovery key v1\nzz").is_err());
        assert!(import(&"0".repeat(5000)).is_err());
    }
}
