//! Code generated from proto/stocksblitz/user/v1 by build.rs.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("stocksblitz.user.v1");

/// Encoded FileDescriptorSet of our protos, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/user_v1_descriptor.bin"));
