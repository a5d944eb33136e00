//! Null volume: reads return zeroes, writes are dropped. For transport benchmarks and smoke tests.

use super::{BufResult, Geometry, IoFuture, Volume, VolumeError};

/// A volume that stores nothing.
#[derive(Debug)]
pub struct NullVolume {
    geometry: Geometry,
}

impl NullVolume {
    pub fn new(block_size: u32, blocks: u64) -> Self {
        Self { geometry: Geometry { block_size, blocks } }
    }
}

impl Volume for NullVolume {
    fn kind(&self) -> &'static str {
        "null"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, lba: u64, mut buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let result = self.geometry.check(lba, buf.len()).map(|_| buf.fill(0));
        Box::pin(std::future::ready((buf, result)))
    }

    fn write(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        let result = self.geometry.check(lba, buf.len()).map(drop);
        Box::pin(std::future::ready((buf, result)))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        let end = lba.saturating_add(blocks);
        let result = if end > self.geometry.blocks {
            Err(VolumeError::OutOfRange { start: lba, end, capacity: self.geometry.blocks })
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        super::super::tests::conformance(&super::NullVolume::new(512, 4096)).await;
    }
}
