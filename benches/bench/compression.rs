//! What gRPC compression (zstd, gzip) saves per record on a batch of the realistic mix, and what it costs: gzip at tonic's level (what each gzip subscriber used to cost) and at the level the agent now uses once per block for all of them.

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
    // CPU per record: each codec over the same batch, the best of 20 rounds.
    let time = |f: &dyn Fn() -> usize| {
        (0..20)
            .map(|_| {
                let t0 = std::time::Instant::now();
                std::hint::black_box(f());
                t0.elapsed().as_secs_f64() * 1e9 / 1000.0
            })
            .fold(f64::MAX, f64::min)
    };
    let gz = |level: u32| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(&batch).unwrap();
        e.finish().unwrap().len()
    };
    let zs = || zstd::bulk::compress(&batch, 3).unwrap().len();
    let codecs: [(&str, &dyn Fn() -> usize); 3] = [
        ("gzip level 6 (tonic's, per subscriber)", &|| gz(6)),
        ("gzip level 1 (the agent's, once per block)", &|| gz(1)),
        ("zstd level 3 (once per block)", &zs),
    ];
    for (what, compress) in codecs {
        t.add(
            "stream",
            what,
            time(compress),
            "ns/rec",
            format!("{:.1} B/record", compress() as f64 / 1000.0),
        );
    }
    Ok(())
}
