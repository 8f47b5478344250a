pub mod model;
pub mod store;

pub mod api;
pub mod feed;
pub mod fields;
pub mod import;
pub mod quota;
pub mod retention;
pub mod snapshot;
pub mod store_sink;
pub mod upload;
