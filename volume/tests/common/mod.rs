//! Helpers the volume tests over a directory bucket share.

use std::path::Path;

use berth_blockdev::target::read_at;
use berth_volume::admin::{self, CreateOptions, COMMAND_PATIENCE};
use berth_volume::{Location, Store, Volume};

pub const MIB: u64 = 1 << 20;

/// Creates a 16 MiB volume `vol` in a file:// bucket at `bucket`.
pub fn create(bucket: &Path) -> Location {
    let location = Location::parse(&format!("file://{}/vol", bucket.display())).unwrap();
    let options = CreateOptions {
        size: Some(16 * MIB),
        ..CreateOptions::default()
    };
    admin::create(&location, &options, None).unwrap();
    location
}

/// `len` bytes at `offset` of `volume` (a failed read fails the test, naming the range).
pub fn read(volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0x5a; len];
    read_at(volume, offset, &mut buf)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset}: {e}"));
    buf
}

/// The packs `keys` names that the bucket no longer holds.
pub fn missing(store: &Store, keys: impl IntoIterator<Item = String>) -> Vec<String> {
    let present: Vec<String> = store
        .list("packs", COMMAND_PATIENCE)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    keys.into_iter().filter(|k| !present.contains(k)).collect()
}

/// The packs the latest manifest version uses that the bucket no longer holds.
pub fn missing_from_latest(location: &Location) -> Vec<String> {
    let store = Store::open(location).unwrap();
    let config = store.load_config(COMMAND_PATIENCE).unwrap();
    let versions = store.manifest_versions(COMMAND_PATIENCE).unwrap();
    let latest = *versions.last().unwrap();
    let (state, _) = store.load_state(&config, latest, COMMAND_PATIENCE).unwrap();
    missing(&store, state.packs.values().map(|p| p.key.clone()))
}
