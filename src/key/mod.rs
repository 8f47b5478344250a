//! API keys: the wire format, its checksum, hashing and masking.
//!
//! A key is `<prefix>_<32 base62 chars><6 base62 chars of CRC32>`. The checksum
//! covers `<prefix>_<body>`, so the gateway can refuse typos and garbage before
//! it spends a SHA-256 or a map lookup on them. Only the SHA-256 digest of the
//! whole key string is ever stored.

use std::fmt;

use rand::Rng;
use sha2::{Digest as _, Sha256};

pub const DEFAULT_PREFIX: &str = "kg_live";
/// Random characters after the prefix (~190 bits of entropy).
pub const BODY_LEN: usize = 32;
/// Base62 characters of the CRC32 checksum: 62^6 > 2^32.
pub const CHECKSUM_LEN: usize = 6;
pub const MAX_PREFIX_LEN: usize = 32;
/// Longest string that can be a key; anything longer is refused without parsing.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + 1 + BODY_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    #[error("key does not have the form <prefix>_<38 base62 characters>")]
    Malformed,
    #[error("key checksum does not match")]
    BadChecksum,
    #[error(
        "prefix must be 1 to {MAX_PREFIX_LEN} characters of a-z, A-Z, 0-9 and '_', not starting or ending with '_'"
    )]
    BadPrefix,
}

/// A key that passed the format and checksum checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub prefix: &'a str,
    pub body: &'a str,
}

/// Checks the shape and checksum of a presented key. Does no hashing or lookup.
pub fn parse(raw: &str) -> Result<ParsedKey<'_>, KeyFormatError> {
    if raw.len() > MAX_KEY_LEN {
        return Err(KeyFormatError::TooLong);
    }
    let tail_len = BODY_LEN + CHECKSUM_LEN;
    if raw.len() < tail_len + 2 || !raw.is_ascii() {
        return Err(KeyFormatError::Malformed);
    }
    let (head, tail) = raw.split_at(raw.len() - tail_len);
    let prefix = head.strip_suffix('_').ok_or(KeyFormatError::Malformed)?;
    if !valid_prefix(prefix) {
        return Err(KeyFormatError::Malformed);
    }
    if !all_bytes(tail, |b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::Malformed);
    }
    let (body, checksum) = tail.split_at(BODY_LEN);
    let expected = encode_checksum(crc32fast::hash(&raw.as_bytes()[..raw.len() - CHECKSUM_LEN]));
    if checksum.as_bytes() != expected {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok(ParsedKey { prefix, body })
}

pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && !prefix.starts_with('_')
        && !prefix.ends_with('_')
        && all_bytes(prefix, |b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether every byte of `text` passes `allowed`. Without early exit, so that it is
/// vectorised: keys are checked on every request, and most are well-formed.
fn all_bytes(text: &str, allowed: impl Fn(u8) -> bool) -> bool {
    text.bytes().fold(true, |ok, b| ok & allowed(b))
}

/// Creates a new random key with a valid checksum.
pub fn generate(prefix: &str) -> Result<String, KeyFormatError> {
    if !valid_prefix(prefix) {
        return Err(KeyFormatError::BadPrefix);
    }
    let mut rng = rand::rng();
    let mut key = String::with_capacity(prefix.len() + 1 + BODY_LEN + CHECKSUM_LEN);
    key.push_str(prefix);
    key.push('_');
    for _ in 0..BODY_LEN {
        key.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    let checksum = encode_checksum(crc32fast::hash(key.as_bytes()));
    key.extend(checksum.iter().map(|&b| b as char));
    Ok(key)
}

/// `<prefix>_<body><checksum>` for a chosen body: keys that tests can reproduce.
#[cfg(test)]
pub(crate) fn with_checksum(prefix: &str, body: &str) -> String {
    let mut key = format!("{prefix}_{body}");
    let checksum = encode_checksum(crc32fast::hash(key.as_bytes()));
    key.extend(checksum.iter().map(|&b| b as char));
    key
}

/// Fixed-width, zero-padded base62 so every key has the same length for its prefix.
fn encode_checksum(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

/// The display form of a key: prefix, first four and last four characters.
/// `kg_live_Ab3dXXXX...x9Zq` becomes `kg_live_Ab3d…x9Zq`.
pub fn mask(raw: &str) -> String {
    match parse(raw) {
        Ok(key) => format!("{}_{}…{}", key.prefix, &key.body[..4], &raw[raw.len() - 4..]),
        Err(_) => "…".to_owned(),
    }
}

/// SHA-256 of a whole key string: the only form in which keys are kept.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyDigest(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected \"sha256:\" followed by 64 lowercase hex characters")]
pub struct DigestFormatError;

impl KeyDigest {
    pub fn of(raw: &str) -> Self {
        KeyDigest(Sha256::digest(raw.as_bytes()).into())
    }

    /// Parses the `sha256:<64 lowercase hex>` form used in files and the store.
    pub fn parse(text: &str) -> Result<Self, DigestFormatError> {
        let hex_part = text.strip_prefix("sha256:").ok_or(DigestFormatError)?;
        if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(DigestFormatError);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| DigestFormatError)?;
        Ok(KeyDigest(bytes))
    }
}

/// SHA-256 output is already uniform, so its first eight bytes are all a hasher
/// needs (see `index::DigestHasher`); callers cannot choose digests to collide.
impl std::hash::Hash for KeyDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn generated_keys_parse_with_their_prefix() {
        for prefix in [DEFAULT_PREFIX, "kg_test", "acme", "a1_b2_c3"] {
            let key = generate(prefix).unwrap();
            let parsed = parse(&key).unwrap();
            assert_eq!(parsed.prefix, prefix);
            assert_eq!(parsed.body.len(), BODY_LEN);
            assert_eq!(key.len(), prefix.len() + 1 + BODY_LEN + CHECKSUM_LEN);
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(generate("kg").unwrap(), generate("kg").unwrap());
    }

    #[test]
    fn any_single_character_change_breaks_the_checksum() {
        let key = generate(DEFAULT_PREFIX).unwrap();
        let bytes = key.as_bytes();
        for i in DEFAULT_PREFIX.len() + 1..bytes.len() {
            let mut changed = bytes.to_vec();
            changed[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(changed).unwrap();
            assert_eq!(parse(&changed), Err(KeyFormatError::BadChecksum), "position {i}");
        }
    }

    #[test]
    fn checksum_covers_the_prefix() {
        let key = generate("kg_live").unwrap();
        let other_prefix = key.replacen("kg_live", "kg_test", 1);
        assert_eq!(parse(&other_prefix), Err(KeyFormatError::BadChecksum));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let key = generate(DEFAULT_PREFIX).unwrap();
        let cases = [
            String::new(),
            "kg_live_short".to_owned(),
            key[DEFAULT_PREFIX.len() + 1..].to_owned(), // no prefix
            key.replacen('_', "-", 1),                  // bad separator
            format!("{key}x"),                          // one character too many in the tail
            key.replacen(&key[key.len() - 10..key.len() - 9], "-", 1),
            format!("é{}", &key[2..]),
        ];
        for case in cases {
            assert!(parse(&case).is_err(), "{case:?} parsed");
        }
        assert_eq!(parse(&"a".repeat(MAX_KEY_LEN + 1)), Err(KeyFormatError::TooLong));
    }

    #[test]
    fn bad_prefixes_are_refused_at_generation() {
        for prefix in ["", "_x", "x_", "has space", "dash-y", &"p".repeat(MAX_PREFIX_LEN + 1)] {
            assert_eq!(generate(prefix), Err(KeyFormatError::BadPrefix), "{prefix:?}");
        }
    }

    #[test]
    fn checksum_is_fixed_width_base62() {
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(61), b"00000z");
        assert_eq!(&encode_checksum(62), b"000010");
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn mask_shows_prefix_and_four_characters_each_side() {
        let key = generate(DEFAULT_PREFIX).unwrap();
        let masked = mask(&key);
        assert!(masked.starts_with("kg_live_"));
        assert_eq!(masked, format!("kg_live_{}…{}", &key[8..12], &key[key.len() - 4..]));
        assert!(!masked.contains(&key[12..key.len() - 4]));
    }

    #[test]
    fn digest_round_trips_through_its_text_form() {
        let digest = KeyDigest::of("kg_live_example");
        let text = digest.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(KeyDigest::parse(&text), Ok(digest));
    }

    #[test]
    fn digest_matches_known_sha256() {
        assert_eq!(
            KeyDigest::of("abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn digest_parse_refuses_other_forms() {
        let hex64 = "a".repeat(64);
        for bad in [
            hex64.clone(),
            format!("sha1:{hex64}"),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", &hex64[1..]),
            format!("sha256:{}g", &hex64[1..]),
        ] {
            assert!(KeyDigest::parse(&bad).is_err(), "{bad}");
        }
    }

    fn prefix() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9]([a-zA-Z0-9_]{0,30}[a-zA-Z0-9])?"
    }

    fn body() -> impl Strategy<Value = String> {
        "[0-9A-Za-z]{32}"
    }

    /// Mostly characters a key is made of, so that changes stay close to a key.
    fn replacement() -> impl Strategy<Value = char> {
        prop_oneof![
            3 => proptest::sample::select(BASE62.iter().map(|&b| char::from(b)).chain(['_']).collect::<Vec<_>>()),
            1 => any::<char>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parsing_and_masking_any_string_never_panics(
            text in prop_oneof![any::<String>(), "[a-zA-Z0-9_]{0,80}", "sha256:[0-9a-fA-F]{0,70}"],
        ) {
            if let Ok(key) = parse(&text) {
                prop_assert!(valid_prefix(key.prefix));
                prop_assert_eq!(key.body.len(), BODY_LEN);
                prop_assert_ne!(mask(&text), "…");
            } else {
                prop_assert_eq!(mask(&text), "…");
            }
            if let Ok(digest) = KeyDigest::parse(&text) {
                prop_assert_eq!(digest.to_string(), text);
            }
        }

        #[test]
        fn keys_with_their_checksum_always_parse(prefix in prefix(), body in body()) {
            let key = with_checksum(&prefix, &body);
            prop_assert_eq!(parse(&key), Ok(ParsedKey { prefix: &prefix, body: &body }));
            prop_assert_eq!(mask(&key), format!("{prefix}_{}…{}", &body[..4], &key[key.len() - 4..]));
        }

        #[test]
        fn generated_keys_always_parse(prefix in prefix()) {
            let key = generate(&prefix).unwrap();
            prop_assert_eq!(parse(&key).map(|k| k.prefix), Ok(prefix.as_str()));
            prop_assert_eq!(key.len(), prefix.len() + 1 + BODY_LEN + CHECKSUM_LEN);
        }

        #[test]
        fn a_one_character_change_is_always_refused(
            prefix in prefix(),
            body in body(),
            at in any::<proptest::sample::Index>(),
            with in replacement(),
        ) {
            let key = with_checksum(&prefix, &body);
            let i = at.index(key.len());
            prop_assume!(char::from(key.as_bytes()[i]) != with);
            let mut changed = key.clone();
            changed.replace_range(i..=i, with.encode_utf8(&mut [0; 4]));
            prop_assert!(parse(&changed).is_err(), "{changed:?} parsed");
        }

        #[test]
        fn digest_text_round_trips(bytes in any::<[u8; 32]>()) {
            let digest = KeyDigest(bytes);
            prop_assert_eq!(KeyDigest::parse(&digest.to_string()), Ok(digest));
        }
    }
}
