//! Gateway side of key distribution: where the key index comes from and how it stays fresh.

mod keys_file;

pub use keys_file::KeysFileSource;
