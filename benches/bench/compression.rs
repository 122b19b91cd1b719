//! What gRPC compression (zstd, gzip) saves per record on a batch of the realistic mix.

use std::io::Write;

use anyhow::Result;

use crate::common::{mixed_record, Table};

/// What gRPC compression saves on a batch of 1000 records of the realistic mix.
pub fn run(t: &mut Table) -> Result<()> {
    use prost::Message;
    let batch = flowlens::record::api::proto::FlowBatch {
        records: (0..1000u64)
            .map(|i| flowlens::record::api::proto::FlowRecord::from(&mixed_record(i)))
            .collect(),
    }
    .encode_to_vec();
    let zstd = zstd::bulk::compress(&batch, 0)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&batch)?;
    let gzip = gz.finish()?;
    let per = |b: &[u8]| b.len() as f64 / 1000.0;
    t.add(
        "stream",
        "bytes/record, uncompressed",
        per(&batch),
        "B",
        "1000-record batch, 40/50/10 TCP/UDP/ICMP".into(),
    );
    t.add(
        "stream",
        "bytes/record, zstd (watch default)",
        per(&zstd),
        "B",
        format!("{:.2}x smaller", batch.len() as f64 / zstd.len() as f64),
    );
    t.add(
        "stream",
        "bytes/record, gzip",
        per(&gzip),
        "B",
        format!("{:.2}x smaller", batch.len() as f64 / gzip.len() as f64),
    );
    Ok(())
}
