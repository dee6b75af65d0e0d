//! The linked-VM rules of the SCP seed (section 4.5.3) as pure functions.

use std::cmp::Ordering;
use std::fmt;

use provider_api::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// A platform version such as `6.11.3`, compared numerically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScpVersion(Vec<u64>);

impl ScpVersion {
    /// Parse a version as the platform reports it in `build_version`
    /// (`SCP6.11.3 B-2025-07-25 10:00:00`) or bare (`6.11.3`): an optional
    /// `SCP` prefix, the first word only, and non-numeric suffixes of a part
    /// ignored (`6.11.3-beta` is 6.11.3, as the platform judges it).
    pub fn parse(text: &str) -> Result<Self> {
        let word = text.split_whitespace().next().unwrap_or_default();
        let word = word
            .strip_prefix("SCP")
            .or_else(|| word.strip_prefix("scp"))
            .unwrap_or(word);
        let parts: Option<Vec<u64>> = word
            .split('.')
            .map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .collect();
        match parts {
            Some(p) if !p.is_empty() => Ok(ScpVersion(p)),
            _ => Err(Error::new(
                ErrorKind::Platform,
                format!("SCP version {text:?} does not parse"),
            )),
        }
    }

    /// The first version with separate base-image backup.
    pub fn separate_base_images() -> Self {
        ScpVersion(vec![6, 11, 3])
    }
}

impl PartialOrd for ScpVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ScpVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.0.len().max(other.0.len());
        for i in 0..n {
            let a = self.0.get(i).copied().unwrap_or(0);
            let b = other.0.get(i).copied().unwrap_or(0);
            match a.cmp(&b) {
                Ordering::Equal => continue,
                o => return o,
            }
        }
        Ordering::Equal
    }
}

impl fmt::Display for ScpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

/// How a disk's base image is handled in a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BasePolicy {
    /// Not a linked disk.
    NotLinked,
    /// The base image is backed up separately (once for the whole backup
    /// system); `base_cbt` says whether its allocated areas come from CBT
    /// (`base_image=1, checkpoint_id=0`) or the whole image is read.
    Separate {
        /// Base image areas from CBT.
        base_cbt: bool,
    },
    /// No separate base image: the system disk is read merged (its CBT
    /// already includes the base image).
    Merged,
}

/// The rule table of section 4.5.3:
///
/// | version | desktop (`application=="desk"`) | what is backed up |
/// | --- | --- | --- |
/// | ≥ 6.11.3 | any | system disk overlay from CBT + base image from CBT |
/// | < 6.11.3 | no | system disk merged (base included), no base image |
/// | < 6.11.3 | yes | system disk overlay from CBT + base image in full |
///
/// Revert mode (`revert_mode == 1`) is refused before this is asked (see
/// [`check_backup_allowed`]).
pub fn base_policy(version: &ScpVersion, desktop: bool, linked: bool) -> BasePolicy {
    if !linked {
        BasePolicy::NotLinked
    } else if *version >= ScpVersion::separate_base_images() {
        BasePolicy::Separate { base_cbt: true }
    } else if desktop {
        BasePolicy::Separate { base_cbt: false }
    } else {
        BasePolicy::Merged
    }
}

/// Desktop VMs in revert mode cannot be backed up agentless.
pub fn check_backup_allowed(server_id: &str, name: &str, revert_mode: i64) -> Result<()> {
    if revert_mode == 1 {
        return Err(Error::new(
            ErrorKind::Refused,
            format!(
                "VM {name:?} is a desktop-cloud VM in revert mode (revert_mode=1): \
                 agentless backup is not supported"
            ),
        )
        .guest(server_id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s| ScpVersion::parse(s).unwrap();
        assert!(v("6.11.3") >= ScpVersion::separate_base_images());
        assert!(v("6.11.10") > v("6.11.3"));
        assert!(v("6.11.2") < v("6.11.3"));
        assert!(v("6.12") > v("6.11.3"));
        assert!(v("7") > v("6.11.3"));
        assert_eq!(v("6.11.3-beta"), v("6.11.3"));
        assert_eq!(v("SCP6.11.3 B-2025-07-25 10:00:00"), v("6.11.3"));
        assert_eq!(v("SCP6.7.33 B-2022-06-07 19:45:13"), v("6.7.33"));
        assert!(v("SCP6.11.2-rc1 B-2024") < ScpVersion::separate_base_images());
        assert!(ScpVersion::parse("x").is_err());
    }

    #[test]
    fn rule_table() {
        let new = ScpVersion::parse("6.11.3").unwrap();
        let old = ScpVersion::parse("6.11.2").unwrap();
        assert_eq!(
            base_policy(&new, false, true),
            BasePolicy::Separate { base_cbt: true }
        );
        assert_eq!(
            base_policy(&new, true, true),
            BasePolicy::Separate { base_cbt: true }
        );
        assert_eq!(base_policy(&old, false, true), BasePolicy::Merged);
        assert_eq!(
            base_policy(&old, true, true),
            BasePolicy::Separate { base_cbt: false }
        );
        assert_eq!(base_policy(&old, true, false), BasePolicy::NotLinked);
        let e = check_backup_allowed("vm-1", "desk-1", 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("desk-1"));
        check_backup_allowed("vm-1", "desk-1", 0).unwrap();
    }
}
