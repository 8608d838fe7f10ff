//! Verifying a 10 MB bundle: hashing plus one ed25519 verification.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use signing::{BundleHash, Claims, SecretKey, Signature, Trust, verify};

fn bench(c: &mut Criterion) {
    let bytes: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let key = SecretKey::from_seed([5; 32]);
    let mut trust = Trust::default();
    trust.add(key.public());
    let claims = Claims {
        name: "bench".into(),
        version: "1.0.0".into(),
        sha256: BundleHash::of(&bytes),
        size: bytes.len() as u64,
        abi: 1,
        signed_at: 0,
    };
    let sig = Signature::sign(&key, claims).unwrap();
    let shared: std::sync::Arc<[u8]> = bytes.into();
    let mut g = c.benchmark_group("signing");
    g.throughput(Throughput::Bytes(shared.len() as u64));
    g.bench_function("verify_10mb_bundle", |b| {
        b.iter(|| verify(shared.clone(), &sig, &trust).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
