//! The node's state volume: which disk, its GPT, its ext4 filesystem (our
//! own formatter: no mkfs binary, no GPL code in PID 1), and crash-safe
//! files on it. No policy about what is stored lives here.
#![warn(missing_docs)]

pub mod disks;
pub mod ext4;
pub mod files;
pub mod gpt;
