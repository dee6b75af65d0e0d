//! Allocation units as exporters write them.
//!
//! DSP0004's programmatic units (`byte * 2^30`, `byte*10^9`, `bit * 2^3`)
//! are what the OVF standard asks for; real files also carry informal
//! names (VirtualBox's `MegaBytes`, `MB`, `GB`, `KiloBytes`). Informal
//! names are binary multiples, as those exporters mean them (VirtualBox
//! writes memory in `MegaBytes` and means MiB).

/// The number of bytes one unit of `units` stands for, or `None` when the
/// notation is not understood. Case and spaces do not matter.
pub fn multiplier(units: &str) -> Option<u64> {
    let u: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let informal = match u.as_str() {
        "" | "b" | "byte" | "bytes" => Some(1),
        "k" | "kb" | "kib" | "kilobyte" | "kilobytes" => Some(1 << 10),
        "m" | "mb" | "mib" | "megabyte" | "megabytes" => Some(1 << 20),
        "g" | "gb" | "gib" | "gigabyte" | "gigabytes" => Some(1 << 30),
        "t" | "tb" | "tib" | "terabyte" | "terabytes" => Some(1 << 40),
        _ => None,
    };
    if informal.is_some() {
        return informal;
    }
    // byte * B^E [* B^E ...]
    let mut parts = u.split('*');
    let first = parts.next()?;
    let mut value: u64 = match first {
        "byte" | "bytes" => 1,
        _ => return None,
    };
    for factor in parts {
        let f = match factor.split_once('^') {
            Some((base, exp)) => {
                let base: u64 = base.parse().ok()?;
                let exp: u32 = exp.parse().ok()?;
                base.checked_pow(exp)?
            }
            None => factor.parse().ok()?,
        };
        value = value.checked_mul(f)?;
    }
    (value > 0).then_some(value)
}

/// `quantity` of `units` in bytes, `None` on an unknown unit or overflow.
pub fn bytes(quantity: u64, units: Option<&str>) -> Option<u64> {
    quantity.checked_mul(multiplier(units.unwrap_or("byte"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmatic_and_informal_units() {
        assert_eq!(multiplier("byte * 2^30"), Some(1 << 30));
        assert_eq!(multiplier("byte*2^20"), Some(1 << 20));
        assert_eq!(multiplier("byte * 10^9"), Some(1_000_000_000));
        assert_eq!(multiplier("byte * 1024^2"), Some(1 << 20));
        assert_eq!(multiplier("byte * 2^10 * 2^10"), Some(1 << 20));
        assert_eq!(multiplier("MegaBytes"), Some(1 << 20));
        assert_eq!(multiplier("GB"), Some(1 << 30));
        assert_eq!(multiplier("bytes"), Some(1));
        assert_eq!(multiplier(""), Some(1));
        assert_eq!(multiplier("hertz * 10^6"), None);
        assert_eq!(multiplier("byte * 2^64"), None, "overflow");
        assert_eq!(multiplier("byte * 0"), None);
        assert_eq!(multiplier("byte * x^2"), None);
        assert_eq!(bytes(16, Some("byte * 2^30")), Some(16 << 30));
        assert_eq!(bytes(u64::MAX, Some("GB")), None);
        assert_eq!(bytes(512, None), Some(512));
    }
}
