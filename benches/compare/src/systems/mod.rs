//! One module per system under test, each implementing
//! [`crate::workload::System`].

pub mod cluster;
pub mod fjall;
pub mod hashmap;
pub mod idemkv;
pub mod redb;
pub mod redis;
