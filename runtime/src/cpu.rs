//! CPU levels: what an artifact's code may use, and what this machine offers.
//!
//! A [`Level`] is a compile input (`kiln compile --cpu`): Cranelift's flags, the hand-written
//! kernels the runtime dispatches to and the layout weights are packed in all follow it, never the
//! compiling machine's feature list. An artifact records its level and exactly the features that
//! level's code uses (the level's own list, [`Level::features`]); loading refuses it only when this
//! CPU lacks one of them, and ignores names it does not know.

use std::fmt;

/// An instruction-set level. On x86-64 the levels are the psABI's microarchitecture levels;
/// elsewhere only [`Level::Portable`] exists (the architecture's baseline, e.g. NEON on aarch64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The architecture's baseline (x86-64: SSE2): kiln's portable kernels only.
    Portable,
    /// x86-64-v2: SSE4.2, POPCNT, CMPXCHG16B.
    V2,
    /// x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE.
    V3,
    /// x86-64-v4: AVX-512 F, BW, CD, DQ, VL.
    V4,
}

const V2_FEATURES: &[&str] = &["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cmpxchg16b"];
const V3_FEATURES: &[&str] = &["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "lzcnt", "movbe"];
const V4_FEATURES: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 4] = [Level::Portable, Level::V2, Level::V3, Level::V4];

    /// The name `--cpu` takes and the artifact records.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::V2 => "x86-64-v2",
            Level::V3 => "x86-64-v3",
            Level::V4 => "x86-64-v4",
        }
    }

    /// Parses a `--cpu` value: a level's name, or `native` (the best level this machine runs).
    pub fn parse(s: &str) -> Result<Level, String> {
        if s == "native" {
            return Ok(Level::host());
        }
        match Level::by_name(s) {
            Some(l) if l.exists_on_this_arch() => Ok(l),
            Some(l) => Err(format!(
                "CPU level `{}` is for x86-64; this is {}",
                l.name(),
                std::env::consts::ARCH
            )),
            None => Err(format!(
                "unknown CPU level `{s}`; expected native, {}",
                Level::ALL.map(|l| l.name()).join(", ")
            )),
        }
    }

    /// The level of that name (`native` is not a name: see [`Level::parse`]).
    pub fn by_name(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }

    fn exists_on_this_arch(self) -> bool {
        self == Level::Portable || cfg!(target_arch = "x86_64")
    }

    /// The features this level's code may use, cumulative (v3 includes v2's).
    pub fn features(self) -> Vec<&'static str> {
        let lists: &[&[&str]] = match self {
            Level::Portable => &[],
            Level::V2 => &[V2_FEATURES],
            Level::V3 => &[V2_FEATURES, V3_FEATURES],
            Level::V4 => &[V2_FEATURES, V3_FEATURES, V4_FEATURES],
        };
        lists.iter().flat_map(|l| l.iter().copied()).collect()
    }

    /// Whether this machine can run code of this level.
    pub fn runs_here(self) -> bool {
        self.exists_on_this_arch() && self.features().iter().all(|f| has(f) == Some(true))
    }

    /// The best level this machine runs (what `--cpu native` means).
    pub fn host() -> Level {
        Level::ALL
            .into_iter()
            .rev()
            .find(|l| l.runs_here())
            .unwrap_or(Level::Portable)
    }

    /// Every level this machine runs, lowest first.
    pub fn runnable() -> Vec<Level> {
        Level::ALL.into_iter().filter(|l| l.runs_here()).collect()
    }

    /// The highest level whose features are all in `features` (for artifacts that name features
    /// without a level).
    pub fn from_features(features: &[String]) -> Level {
        let all = |l: Level| l.features().iter().all(|f| features.iter().any(|g| g == f));
        Level::ALL
            .into_iter()
            .rev()
            .find(|l| all(*l))
            .unwrap_or(Level::Portable)
    }

    /// AVX2 and FMA kernels may run (x86-64-v3 and up).
    pub fn avx2(self) -> bool {
        cfg!(target_arch = "x86_64") && self >= Level::V3
    }

    /// AVX-512 kernels may run (x86-64-v4).
    pub fn avx512(self) -> bool {
        cfg!(target_arch = "x86_64") && self >= Level::V4
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The integer dot-product extension quantized products may use beyond the level (`vpdpbusd`):
/// recorded in the artifact as one more feature, so loading checks it like the level's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vnni {
    /// None: quantized prefills dequantize for the f32 kernels.
    None,
    /// AVX-VNNI (256-bit, VEX), with x86-64-v3.
    Avx,
    /// AVX-512 VNNI (512-bit), with x86-64-v4.
    Avx512,
}

impl Vnni {
    /// The feature name it adds to an artifact.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Vnni::None => None,
            Vnni::Avx => Some("avxvnni"),
            Vnni::Avx512 => Some("avx512vnni"),
        }
    }

    /// The widest extension code of `level` may use whose features satisfy `has`.
    fn best(level: Level, has: impl Fn(&str) -> bool) -> Vnni {
        if level.avx512() && has("avx512vnni") {
            Vnni::Avx512
        } else if level.avx2() && has("avxvnni") {
            Vnni::Avx
        } else {
            Vnni::None
        }
    }

    /// The best this machine offers code of `level`.
    pub fn host(level: Level) -> Vnni {
        Vnni::best(level, |f| has(f) == Some(true))
    }

    /// What an artifact of `level` that records `features` uses.
    pub fn from_features(level: Level, features: &[String]) -> Vnni {
        Vnni::best(level, |f| {
            features.iter().any(|g| g == f || (f == "avxvnni" && g == "avx_vnni"))
        })
    }
}

/// A `--cpu` value: a level, and whether VNNI is used with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuArg {
    /// The level.
    pub level: Level,
    /// The extension quantized products use.
    pub vnni: Vnni,
}

impl CpuArg {
    /// `native` (this machine's level and VNNI, if it has it), a level's name, or a level's name
    /// with `+vnni` (AVX-512 VNNI with x86-64-v4, AVX-VNNI with x86-64-v3).
    pub fn parse(s: &str) -> Result<CpuArg, String> {
        let (name, vnni) = match s.strip_suffix("+vnni") {
            Some(n) => (n, true),
            None => (s, false),
        };
        let level = Level::parse(name)?;
        let vnni = match (name, vnni) {
            ("native", _) => Vnni::host(level),
            (_, false) => Vnni::None,
            (_, true) => match Vnni::best(level, |_| true) {
                Vnni::None => return Err(format!("`+vnni` needs x86-64-v3 or x86-64-v4, not {level}")),
                v => v,
            },
        };
        Ok(CpuArg { level, vnni })
    }

    /// This machine's best.
    pub fn host() -> CpuArg {
        let level = Level::host();
        CpuArg {
            level,
            vnni: Vnni::host(level),
        }
    }

    /// The features an artifact for it records: the level's, and the extension's.
    pub fn features(self) -> Vec<&'static str> {
        let mut f = self.level.features();
        f.extend(self.vnni.feature());
        f
    }
}

impl fmt::Display for CpuArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vnni.feature() {
            Some(v) => write!(f, "{}+{v}", self.level),
            None => write!(f, "{}", self.level),
        }
    }
}

/// Whether this CPU has `feature` (names as Rust's `is_x86_feature_detected!` spells them);
/// `None` for a name this runtime does not know.
pub fn has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as d;
        Some(match feature {
            "sse3" => d!("sse3"),
            "ssse3" => d!("ssse3"),
            "sse4.1" => d!("sse4.1"),
            "sse4.2" => d!("sse4.2"),
            "popcnt" => d!("popcnt"),
            "cmpxchg16b" => d!("cmpxchg16b"),
            "avx" => d!("avx"),
            "avx2" => d!("avx2"),
            "fma" => d!("fma"),
            "bmi1" => d!("bmi1"),
            "bmi2" => d!("bmi2"),
            "lzcnt" => d!("lzcnt"),
            "movbe" => d!("movbe"),
            "f16c" => d!("f16c"),
            "avx512f" => d!("avx512f"),
            "avx512bw" => d!("avx512bw"),
            "avx512cd" => d!("avx512cd"),
            "avx512dq" => d!("avx512dq"),
            "avx512vl" => d!("avx512vl"),
            "avx512vnni" => d!("avx512vnni"),
            "avx512bf16" => d!("avx512bf16"),
            "avx512bitalg" => d!("avx512bitalg"),
            "avx512vbmi" => d!("avx512vbmi"),
            "avxvnni" | "avx_vnni" => d!("avxvnni"),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        None
    }
}

/// The features of `wanted` this CPU lacks (names it does not know are not counted: an artifact
/// never fails to load over a name this runtime cannot check).
pub fn missing(wanted: &[String]) -> Vec<String> {
    wanted.iter().filter(|f| has(f) == Some(false)).cloned().collect()
}

/// This CPU's model name, as the OS reports it (`/proc/cpuinfo` on Linux).
pub fn model_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| format!("unknown {} CPU", std::env::consts::ARCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_nest_and_parse() {
        for w in Level::ALL.windows(2) {
            let (lo, hi) = (w[0].features(), w[1].features());
            assert!(lo.iter().all(|f| hi.contains(f)), "{} ⊄ {}", w[0], w[1]);
        }
        for l in Level::runnable() {
            assert_eq!(Level::parse(l.name()), Ok(l));
            assert_eq!(
                Level::from_features(&l.features().iter().map(|s| s.to_string()).collect::<Vec<_>>()),
                l
            );
        }
        assert_eq!(Level::parse("native"), Ok(Level::host()));
        assert!(Level::parse("x86-64-v9")
            .unwrap_err()
            .contains("expected native, portable"));
        assert!(Level::host().runs_here() && Level::Portable.runs_here());
    }

    #[test]
    fn every_level_feature_is_known() {
        if cfg!(target_arch = "x86_64") {
            for f in Level::V4.features() {
                assert!(has(f).is_some(), "{f}");
            }
        }
        assert_eq!(has("some-future-extension"), None);
        assert!(missing(&["some-future-extension".to_string()]).is_empty());
    }

    #[test]
    fn vnni_follows_the_level_and_is_recorded() {
        let v4 = CpuArg::parse("x86-64-v4+vnni").unwrap();
        assert_eq!((v4.level, v4.vnni), (Level::V4, Vnni::Avx512));
        assert!(v4.features().contains(&"avx512vnni"));
        assert_eq!(CpuArg::parse("x86-64-v3+vnni").unwrap().vnni, Vnni::Avx);
        assert_eq!(CpuArg::parse("x86-64-v4").unwrap().vnni, Vnni::None);
        assert!(CpuArg::parse("portable+vnni").unwrap_err().contains("x86-64-v3"));
        let f = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Vnni::from_features(Level::V4, &f(&["avx512vnni"])), Vnni::Avx512);
        assert_eq!(Vnni::from_features(Level::V3, &f(&["avx512vnni"])), Vnni::None);
        assert_eq!(Vnni::from_features(Level::V3, &f(&["avx_vnni"])), Vnni::Avx);
        let host = CpuArg::host();
        assert_eq!(CpuArg::parse("native"), Ok(host));
        for f in host.features() {
            assert_eq!(has(f), Some(true), "{f}");
        }
    }
}
