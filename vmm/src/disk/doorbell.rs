//! The exit handler of `DISK_PORT`: one guest command, done whole before
//! the vCPU runs (or parks) again. See the module docs of [`crate::disk`].

use std::sync::Arc;

use super::image::{BlockIndex, BlockRead, BlockWrite, Disk, BLOCK_BYTES};
use super::DiskError;
use crate::abi;
use crate::mem::GuestRam;

/// The disk as the vCPU thread sees it: the image and the guest RAM its
/// commands and DMA pages live in.
#[derive(Debug, Clone)]
pub struct DiskPort {
    ram: Arc<GuestRam>,
    disk: Arc<Disk>,
}

impl DiskPort {
    /// The port of `disk` for a guest in `ram`.
    pub fn new(ram: Arc<GuestRam>, disk: Arc<Disk>) -> Self {
        DiskPort { ram, disk }
    }

    /// Executes the command the guest rang for with `cmd` (a `DISK_CMD_*`).
    pub fn doorbell(&self, cmd: u64) -> Result<(), DiskError> {
        let count = self.ram.read_u64(abi::CB_GPA + abi::CB_DISK_COUNT)?;
        if !(1..=abi::DISK_BATCH_MAX).contains(&count) {
            return Err(DiskError::Command(format!(
                "{count} blocks (1..={})",
                abi::DISK_BATCH_MAX
            )));
        }
        let mut buf = Box::new([0u8; BLOCK_BYTES]);
        for i in 0..count {
            let block = BlockIndex(self.ram.read_u64(abi::DISK_LIST_GPA + i * 8)?);
            let dma = abi::DISK_DMA_GPA + i * BLOCK_BYTES as u64;
            match cmd {
                abi::DISK_CMD_WRITE => {
                    self.ram
                        .slice(dma, BLOCK_BYTES as u64)?
                        .copy_to(&mut buf[..]);
                    self.disk.write_block(block, &buf)?;
                }
                abi::DISK_CMD_READ => {
                    self.disk.read_block(block, &mut buf)?;
                    self.ram.write_bytes_logged(dma, &buf[..])?;
                }
                other => return Err(DiskError::Command(format!("unknown command {other}"))),
            }
        }
        Ok(())
    }

    /// The guest's count of block writes since boot.
    pub fn written(&self) -> Result<u64, DiskError> {
        Ok(self.ram.read_u64(abi::CB_GPA + abi::CB_DISK_WRITTEN)?)
    }

    /// Tells the guest how many block writes are due since boot.
    pub fn set_due(&self, due: u64) -> Result<(), DiskError> {
        Ok(self
            .ram
            .write_u64_logged(abi::CB_GPA + abi::CB_DISK_DUE, due)?)
    }

    /// The disk block whose read-back stamp the guest found wrong, and its
    /// version in the guest's table (for the failure message).
    pub fn bad_block(&self) -> Result<(u64, Option<u32>), DiskError> {
        let block = self.ram.read_u64(abi::CB_GPA + abi::CB_DISK_BAD_BLOCK)?;
        let first = self.ram.read_u64(abi::CB_GPA + abi::CB_DISK_FIRST_BLOCK)?;
        let window = self
            .ram
            .read_u64(abi::CB_GPA + abi::CB_DISK_WINDOW_BLOCKS)?;
        let table = self.ram.read_u64(abi::CB_GPA + abi::CB_DISK_TABLE_GPA)?;
        let version = match block.checked_sub(first) {
            Some(w) if w < window => {
                let v = self.ram.slice(table + w * 4, 4)?;
                let mut b = [0u8; 4];
                v.copy_to(&mut b[..]);
                Some(u32::from_le_bytes(b))
            }
            _ => None,
        };
        Ok((block, version))
    }
}
