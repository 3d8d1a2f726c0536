//! Volumes for the block benchmarks: the S3-compatible server they live on (moto on
//! loopback, started as the tests start it), making a volume from the raw image, warming
//! its local cache, and checking written ranges through a fresh open of the volume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use berth_blockdev::target::read_at;
use berth_cache::{BlobBackend, ObjectStoreBackend, S3Config};
use berth_testkit::{http_request, Moto};
use berth_volume::admin::{self, CreateOptions, FileSource};
use berth_volume::{Location, Store, Volume, VolumeOptions};

use crate::blk::{DiskLayout, DISK_ID};
use crate::pattern;

/// Credentials and region moto accepts (any will do; these are what the tests use).
const REGION: &str = "us-east-1";
const KEY: &str = "testing";

/// A moto server with one bucket; stopped when dropped.
pub struct S3Server {
    moto: Moto,
    pub bucket: String,
}

impl S3Server {
    pub fn start(bucket: &str) -> Result<Self> {
        let moto = Moto::start(None).map_err(|why| anyhow!("cannot start the S3 server: {why}"))?;
        let status =
            http_request(moto.port, "PUT", &format!("/{bucket}")).context("creating the bucket")?;
        if !status.contains("200") {
            bail!("creating the bucket {bucket}: {status}");
        }
        Ok(Self {
            moto,
            bucket: bucket.to_string(),
        })
    }

    pub fn endpoint(&self) -> String {
        self.moto.endpoint()
    }

    /// The `AWS_*` environment a child process (berth) needs to reach the bucket.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", KEY.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A client of the whole bucket (object_store's S3 client, as berth's volumes use it).
    pub fn backend(&self) -> Result<Arc<dyn BlobBackend>> {
        let backend = ObjectStoreBackend::s3(&S3Config {
            bucket: self.bucket.clone(),
            prefix: String::new(),
            endpoint: Some(self.endpoint()),
            region: Some(REGION.into()),
            access_key_id: Some(KEY.into()),
            secret_access_key: Some(KEY.into()),
            allow_http: true,
        })?;
        Ok(Arc::new(backend))
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn location(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }
}

/// A volume a benchmark serves, and how to reach it from here and from berth.
pub struct BenchVolume {
    /// `s3://BUCKET/PREFIX`, as berth takes it after `volume:`.
    pub location: String,
    /// `--volume-dir`: the volume's local state (log, cache) lives under it.
    pub volume_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub(crate) backend: Arc<dyn BlobBackend>,
}

impl std::fmt::Debug for BenchVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BenchVolume({})", self.location)
    }
}

/// Volume options as `berth block serve-vhost` opens a volume (its defaults), with the
/// local state under `volume_dir`.
pub fn serve_options(volume_dir: &Path) -> VolumeOptions {
    VolumeOptions {
        cache_dir: volume_dir.to_path_buf(),
        ..VolumeOptions::default()
    }
}

impl BenchVolume {
    fn store(&self) -> Result<Arc<Store>> {
        let location = Location::parse(&self.location)?;
        Ok(Store::with_backend(&location, self.backend.clone()))
    }

    /// Makes the volume `prefix` from `image` (its non-zero blocks uploaded as packs), then
    /// reads its read region once through the volume so that the runs find it in the
    /// local cache, as a volume in use would be.
    pub fn prepare(
        server: &S3Server,
        prefix: &str,
        image: &Path,
        layout: DiskLayout,
        volume_dir: &Path,
    ) -> Result<Self> {
        let volume = Self {
            location: server.location(prefix),
            volume_dir: volume_dir.to_path_buf(),
            env: server.env(),
            backend: server.backend()?,
        };
        let mut source = FileSource::open(image)?;
        admin::create_in(
            &volume.store()?,
            &CreateOptions {
                size: Some(layout.size),
                ..CreateOptions::default()
            },
            Some(&mut source),
        )
        .with_context(|| {
            format!(
                "creating the volume {} from {}",
                volume.location,
                image.display()
            )
        })?;
        let (start, end) = layout.region(false);
        volume.with_open(|opened| {
            let mut buffer = vec![0u8; DiskLayout::ALIGN as usize];
            for offset in (start..end).step_by(buffer.len()) {
                read_at(opened, offset, &mut buffer)?;
                pattern::check(&buffer, DISK_ID, 0, offset).map_err(|at| {
                    anyhow!("the new volume holds wrong data at {at}: the import lost it")
                })?;
            }
            Ok(())
        })?;
        Ok(volume)
    }

    /// Opens the volume here (the serving berth must have exited and given its lease
    /// back), runs `f`, and closes it again.
    fn with_open(&self, f: impl FnOnce(&Volume) -> Result<()>) -> Result<()> {
        let (volume, _) = Volume::open_with_store(self.store()?, serve_options(&self.volume_dir))
            .with_context(|| format!("opening the volume {}", self.location))?;
        let outcome = f(&volume);
        let closed = volume.close();
        outcome?;
        closed.with_context(|| format!("closing the volume {}", self.location))
    }

    /// Checks `ranges` (offset, len) against the pattern of `generation` through a new
    /// open of the volume (what its last writer left in its log, cache and bucket).
    pub fn verify(&self, generation: u64, ranges: &[(u64, u32)]) -> Result<()> {
        self.with_open(|volume| {
            let mut buffer = Vec::new();
            for &(offset, len) in ranges {
                buffer.resize(len as usize, 0);
                read_at(volume, offset, &mut buffer)?;
                pattern::check(&buffer, DISK_ID, generation, offset).map_err(|at| {
                    anyhow!(
                        "the volume holds wrong data at {at} after a write of {len} bytes at {offset}"
                    )
                })?;
            }
            Ok(())
        })
    }
}

/// How long berth may take to exit after the frontend left: it uploads what is left of a
/// volume's log first (at most the volume's drain timeout).
pub fn exit_timeout() -> Duration {
    VolumeOptions::default().drain_timeout + Duration::from_secs(10)
}
