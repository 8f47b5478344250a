pub mod model;
pub mod store;

pub mod api;
pub mod events;
pub mod feed;
pub mod fields;
pub mod gateways;
pub mod import;
pub mod openapi;
pub mod quota;
pub mod retention;
pub mod snapshot;
pub mod store_sink;
pub mod webhooks;
