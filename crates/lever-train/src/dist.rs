//! Data parallelism across processes: the communicator a training step uses to average its
//! gradients. With the `mpi` feature and a process started by an MPI launcher (`mpirun`,
//! `mpiexec`, `srun --mpi=...`) it is MPI's world through rsmpi; otherwise one process alone,
//! where every collective is a copy.
//!
//! The scheme is llm.c's (`train_gpt2.cu`, `multi_gpu_config_init` and its all-reduce of the
//! gradients): every rank holds the whole model, reads its own slice of each global batch,
//! computes gradients on it, and the gradients are summed over the ranks and divided by their
//! number, so every rank applies the same optimizer step to the same weights.
//!
//! Everything here is called from one thread (the training loop's); MPI is initialized with
//! `MPI_THREAD_FUNNELED`, since candle's and rayon's worker threads exist but never call it.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::optim::AdamW;

/// The world this process trains in: its rank and how many ranks there are.
pub struct Dist {
    rank: usize,
    size: usize,
    /// MPI, initialized; finalized when dropped.
    #[cfg(feature = "mpi")]
    universe: Option<mpi::environment::Universe>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

/// Environment variables that MPI launchers set in every rank they start: Open MPI's
/// `mpirun`, MPICH's and Intel MPI's Hydra (`PMI_*`), and PMIx-based launchers (Slurm's
/// `srun --mpi=pmix`).
const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"];

/// The world size a launcher announced, when it did.
#[cfg_attr(feature = "mpi", allow(dead_code))]
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// Elements per MPI call: MPI counts are C ints.
#[cfg(feature = "mpi")]
const MAX_COUNT: usize = 1 << 30;

impl Dist {
    /// One process alone.
    pub fn single() -> Dist {
        Dist {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            universe: None,
        }
    }

    /// The world as the process was started: MPI's when an MPI launcher started it (and
    /// this build has the `mpi` feature), else one process. A process started as one of
    /// several ranks by a build without the feature is refused: every rank would train
    /// alone and write the same run folder.
    pub fn from_env() -> Result<Dist> {
        let launched = LAUNCHER_VARS.iter().any(|k| std::env::var_os(k).is_some());
        #[cfg(feature = "mpi")]
        if launched {
            use mpi::traits::Communicator;
            let Some((universe, _)) =
                mpi::initialize_with_threading(mpi::environment::Threading::Funneled)
            else {
                return Err(mpi_err("MPI was already initialized in this process"));
            };
            let world = universe.world();
            return Ok(Dist {
                rank: world.rank() as usize,
                size: world.size() as usize,
                universe: Some(universe),
            });
        }
        #[cfg(not(feature = "mpi"))]
        if let Some(n) = launched_size().filter(|&n| launched && n > 1) {
            return Err(mpi_err(format!(
                "started as one of {n} ranks by an MPI launcher, but this lever was built \
                 without the `mpi` feature (each rank would train alone); build it with \
                 `cargo build --release --features mpi`"
            )));
        }
        Ok(Dist::single())
    }

    /// Rank `rank` of `size` with no communicator behind it: for tests of who takes which
    /// windows (its collectives copy, as one process's).
    #[cfg(test)]
    pub(crate) fn pretend(rank: usize, size: usize) -> Dist {
        let mut d = Dist::single();
        (d.rank, d.size) = (rank, size);
        d
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0 logs, plots, prints and writes the run's files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// `recv[i] = Σ over ranks of send[i]`, every rank getting the same bits: MPI's
    /// `MPI_Allreduce` with `MPI_SUM`, whose algorithm (Open MPI's ring or recursive
    /// halving, chosen by message and world size) is the same at every step.
    pub fn all_reduce_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths(send.len(), recv.len())?;
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let world = u.world();
            for (s, r) in send.chunks(MAX_COUNT).zip(recv.chunks_mut(MAX_COUNT)) {
                world.all_reduce_into(s, r, SystemOperation::sum());
            }
            return Ok(());
        }
        recv.copy_from_slice(send);
        Ok(())
    }

    /// The same for a few f64 values (loss sums, counts), summed in place.
    pub fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = values.to_vec();
            u.world()
                .all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        let _ = values; // One process: already the sum.
        Ok(())
    }

    /// Rank 0's `values` on every rank.
    pub fn broadcast_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            let world = u.world();
            for part in values.chunks_mut(MAX_COUNT) {
                world.process_at_rank(0).broadcast_into(part);
            }
        }
        let _ = values; // One process: already rank 0's.
    }

    /// Rank 0's `values` on every rank.
    pub fn broadcast_u64(&self, values: &mut [u64]) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            u.world().process_at_rank(0).broadcast_into(values);
        }
        let _ = values; // One process: already rank 0's.
    }

    /// Wait until every rank is here.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::CommunicatorCollectives;
            u.world().barrier();
        }
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::CommunicatorCollectives;
            use mpi::datatype::PartitionMut;
            let world = u.world();
            let len = i32::try_from(mine.len())
                .map_err(|_| mpi_err(format!("{} bytes to gather, too many", mine.len())))?;
            let mut counts = vec![0i32; self.size];
            world.all_gather_into(&len, &mut counts[..]);
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |at, &n| {
                    let d = *at;
                    *at += n;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|&n| n as usize).sum();
            let mut all = vec![0u8; total];
            {
                let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                world.all_gather_varcount_into(mine, &mut parts);
            }
            return Ok(counts
                .iter()
                .zip(&displs)
                .map(|(&n, &d)| all[d as usize..(d + n) as usize].to_vec())
                .collect());
        }
        Ok(vec![mine.to_vec()])
    }

    /// Check that every rank has the same `settings` (a JSON object); a rank that differs
    /// from rank 0 is named with the first key that differs, and `hint` follows. Every rank
    /// returns the same result ([`Error::Disagree`] when they differ).
    pub fn agree(&self, what: &str, settings: &Value, hint: &str) -> Result<()> {
        let all = self.all_gather_bytes(settings.to_string().as_bytes())?;
        let parse = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap_or(Value::Null);
        let root = parse(&all[0]);
        for (r, bytes) in all.iter().enumerate().skip(1) {
            if bytes == &all[0] {
                continue;
            }
            let theirs = parse(bytes);
            let key = first_difference(&root, &theirs);
            let (a, b) = match &key {
                Some(k) => (
                    root.get(k).unwrap_or(&Value::Null),
                    theirs.get(k).unwrap_or(&Value::Null),
                ),
                None => (&root, &theirs),
            };
            return Err(Error::Disagree {
                what: what.into(),
                problem: format!(
                    "rank {r} has {}{b}, rank 0 has {a}; {hint}",
                    key.map_or(String::new(), |k| format!("`{k}` = "))
                ),
            });
        }
        Ok(())
    }

    /// Stop every rank now (`MPI_Abort`): one rank failed while the others may be waiting
    /// for it in a collective. Without MPI the process exits with `code`.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::topology::Communicator;
            u.world().abort(code);
        }
        std::process::exit(code)
    }
}

fn mpi_err(problem: impl Into<String>) -> Error {
    Error::Config {
        what: "MPI".into(),
        problem: problem.into(),
    }
}

fn check_lengths(send: usize, recv: usize) -> Result<()> {
    if send != recv {
        return Err(mpi_err(format!(
            "all-reduce of {send} values into a buffer of {recv}"
        )));
    }
    Ok(())
}

/// The first key (in sorted order) whose value differs between two JSON objects.
fn first_difference(a: &Value, b: &Value) -> Option<String> {
    let (Value::Object(a), Value::Object(b)) = (a, b) else {
        return None;
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.into_iter().find(|k| a.get(*k) != b.get(*k)).cloned()
}

/// Combines gradients over the ranks: packs them (in the variables' order) into one buffer,
/// all-reduces it (sum), divides by the world size for a mean, and puts them back. The two
/// buffers are kept between steps.
#[derive(Default)]
pub(crate) struct GradAverager {
    send: Vec<f32>,
    recv: Vec<f32>,
}

impl GradAverager {
    /// Replace `grads` of `vars` by their mean over the ranks (each rank's are of its own
    /// mean loss, over the same number of tokens: pretraining).
    pub(crate) fn average(
        &mut self,
        dist: &Dist,
        grads: &mut GradStore,
        vars: &[Var],
    ) -> Result<()> {
        self.combine(dist, grads, vars, dist.size() as f32)
    }

    /// Replace `grads` of `vars` by their sum over the ranks (each rank's are of its loss sum
    /// over the whole step's token count: fine-tuning, where ranks train different numbers of
    /// tokens).
    pub(crate) fn sum(&mut self, dist: &Dist, grads: &mut GradStore, vars: &[Var]) -> Result<()> {
        self.combine(dist, grads, vars, 1.0)
    }

    /// A variable without a gradient on this rank counts as zeros, so every rank sends the
    /// same number of values.
    fn combine(
        &mut self,
        dist: &Dist,
        grads: &mut GradStore,
        vars: &[Var],
        divisor: f32,
    ) -> Result<()> {
        let total: usize = vars.iter().map(|v| v.elem_count()).sum();
        self.send.resize(total, 0.0);
        self.recv.resize(total, 0.0);
        let mut at = 0;
        for v in vars {
            let n = v.elem_count();
            let out = &mut self.send[at..at + n];
            match grads.get(v.as_tensor()) {
                Some(g) => copy_f32(g, out)?,
                None => out.fill(0.0),
            }
            at += n;
        }
        dist.all_reduce_sum_f32(&self.send, &mut self.recv)?;
        if divisor != 1.0 {
            for x in self.recv.iter_mut() {
                *x /= divisor;
            }
        }
        let mut at = 0;
        for v in vars {
            let n = v.elem_count();
            let g = Tensor::from_slice(&self.recv[at..at + n], v.shape(), v.device())?;
            grads.insert(v.as_tensor(), g);
            at += n;
        }
        Ok(())
    }
}

/// Give every rank rank 0's trained values and optimizer state (moments and step count) and
/// `scalars` (the caller's step, data position, RNG): a run resumed over MPI reads its
/// checkpoint on rank 0 alone.
pub(crate) fn broadcast_state(
    dist: &Dist,
    vars: &[Var],
    opt: &mut AdamW,
    scalars: &mut [u64],
) -> Result<()> {
    if dist.size() == 1 {
        return Ok(());
    }
    let mut t = [opt.t as u64];
    dist.broadcast_u64(&mut t);
    dist.broadcast_u64(scalars);
    let (mut m, mut v) = opt.moments()?;
    for group in [&mut m, &mut v] {
        for x in group.iter_mut() {
            *x = broadcast_tensor(dist, x)?;
        }
    }
    for var in vars {
        var.set(&broadcast_tensor(dist, var.as_tensor())?)?;
    }
    opt.restore(m, v, t[0] as usize)
}

/// Rank 0's values of `t` (an f32 tensor) on every rank.
fn broadcast_tensor(dist: &Dist, t: &Tensor) -> Result<Tensor> {
    let mut values = vec![0f32; t.elem_count()];
    copy_f32(t, &mut values)?;
    dist.broadcast_f32(&mut values);
    Ok(Tensor::from_vec(values, t.shape(), t.device())?)
}

/// A tensor's values, row-major, into `out` (its length).
fn copy_f32(t: &Tensor, out: &mut [f32]) -> Result<()> {
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            out.copy_from_slice(&data[a..b]);
            return Ok(());
        }
    }
    out.copy_from_slice(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// A 64-bit FNV-1a digest of the variables' f32 bits, in order: equal on every rank while
/// they hold the same weights.
pub fn digest(vars: &[Var]) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = Vec::new();
    for v in vars {
        buf.resize(v.elem_count(), 0.0);
        copy_f32(v.as_tensor(), &mut buf)?;
        for x in &buf {
            h ^= x.to_bits() as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_process_reduces_to_itself() {
        let d = Dist::single();
        assert_eq!((d.rank(), d.size(), d.is_root()), (0, 1, true));
        let mut out = [0.0; 3];
        d.all_reduce_sum_f32(&[1.0, 2.0, 3.0], &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0]);
        let mut v = [2.5, 4.0];
        d.all_reduce_sum_f64(&mut v).unwrap();
        assert_eq!(v, [2.5, 4.0]);
        assert!(d.all_reduce_sum_f32(&[1.0], &mut out).is_err());
        d.agree("settings", &serde_json::json!({"lr": 1}), "")
            .unwrap();
    }

    #[test]
    fn the_first_differing_key_is_named() {
        let a = serde_json::json!({"batch_size": 8, "lr": 0.003, "seed": 1});
        let b = serde_json::json!({"batch_size": 8, "lr": 0.001, "seed": 2});
        assert_eq!(first_difference(&a, &b).as_deref(), Some("lr"));
        let c = serde_json::json!({"batch_size": 8, "lr": 0.003, "seed": 1, "x": 1});
        assert_eq!(first_difference(&a, &c).as_deref(), Some("x"));
        assert_eq!(first_difference(&a, &a), None);
    }

    #[test]
    fn averaging_over_one_rank_keeps_the_gradients_and_the_digest_sees_every_bit() {
        let dev = candle_core::Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev).unwrap()).unwrap();
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 3.0).unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = [w.clone(), b.clone()];
        let before = grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        GradAverager::default()
            .average(&Dist::single(), &mut grads, &vars)
            .unwrap();
        assert_eq!(
            grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            before
        );
        // `b` had no gradient: zeros.
        assert_eq!(
            grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            [0.0]
        );
        let d0 = digest(&vars).unwrap();
        assert_eq!(d0, digest(&vars).unwrap());
        b.set(&Tensor::new(&[0.5f32 + f32::EPSILON], &dev).unwrap())
            .unwrap();
        assert_ne!(d0, digest(&vars).unwrap());
    }
}
