//! PCI addresses: domain, bus, device, function.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input}: {reason} (expected DDDD:BB:DD.F or BB:DD.F, hexadecimal)")]
pub struct BdfError {
    /// The input as echoed: quoted, and bounded (see [`echo`]).
    input: String,
    reason: &'static str,
}

/// How many characters of a bad input an error echoes.
const ECHO_CHARS: usize = 64;

/// `input` quoted for an error message, cut to its first [`ECHO_CHARS`]
/// characters with its length in bytes when longer: an error about a
/// client's input stays small however large the input.
fn echo(input: &str) -> String {
    match input.char_indices().nth(ECHO_CHARS) {
        None => format!("{input:?}"),
        Some((end, _)) => {
            let head = input.get(..end).unwrap_or_default();
            format!("{head:?}… ({} bytes)", input.len())
        }
    }
}

/// A PCI function address, printed the way sysfs names devices
/// (`0000:01:00.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u16,
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// Highest device number on a bus.
    pub const MAX_DEVICE: u8 = 31;
    /// Highest function number of a device.
    pub const MAX_FUNCTION: u8 = 7;

    /// Builds an address, rejecting device and function numbers out of range.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Result<Self, BdfError> {
        let fail = |reason| BdfError {
            input: echo(&format!("{domain:04x}:{bus:02x}:{device:02x}.{function}")),
            reason,
        };
        if device > Self::MAX_DEVICE {
            return Err(fail("device number above 0x1f"));
        }
        if function > Self::MAX_FUNCTION {
            return Err(fail("function number above 7"));
        }
        Ok(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    /// PCI domain (segment).
    pub fn domain(&self) -> u16 {
        self.domain
    }
    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }
    /// Device (slot) number.
    pub fn device(&self) -> u8 {
        self.device
    }
    /// Function number.
    pub fn function(&self) -> u8 {
        self.function
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Parses exactly `digits` hexadecimal digits (no sign, no prefix).
fn hex_field(s: &str, digits: usize) -> Option<u32> {
    if s.len() != digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for Bdf {
    type Err = BdfError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| BdfError {
            input: echo(input),
            reason,
        };
        let (rest, function) = input
            .rsplit_once('.')
            .ok_or_else(|| fail("missing '.' before the function number"))?;
        let function = hex_field(function, 1).ok_or_else(|| fail("bad function number"))?;
        let mut parts = rest.split(':').rev();
        let device = parts
            .next()
            .and_then(|d| hex_field(d, 2))
            .ok_or_else(|| fail("bad device number"))?;
        let bus = parts
            .next()
            .and_then(|b| hex_field(b, 2))
            .ok_or_else(|| fail("bad bus number"))?;
        let domain = match parts.next() {
            None => 0,
            Some(d) => hex_field(d, 4).ok_or_else(|| fail("bad domain number"))?,
        };
        if parts.next().is_some() {
            return Err(fail("too many ':'-separated fields"));
        }
        // Each field was limited by its digit count, so only the device and
        // function ranges are left to check.
        let (Ok(domain), Ok(bus), Ok(device), Ok(function)) = (
            u16::try_from(domain),
            u8::try_from(bus),
            u8::try_from(device),
            u8::try_from(function),
        ) else {
            return Err(fail("field out of range"));
        };
        Self::new(domain, bus, device, function).map_err(|e| fail(e.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let full: Bdf = "0000:01:00.0".parse().unwrap();
        assert_eq!(full, Bdf::new(0, 1, 0, 0).unwrap());
        let short: Bdf = "3a:1f.7".parse().unwrap();
        assert_eq!(short, Bdf::new(0, 0x3a, 0x1f, 7).unwrap());
        assert_eq!(short.to_string(), "0000:3a:1f.7");
        let upper: Bdf = "ABCD:EF:0A.3".parse().unwrap();
        assert_eq!(upper.to_string(), "abcd:ef:0a.3");
    }

    #[test]
    fn rejects_malformed_addresses_naming_the_input() {
        for bad in [
            "",
            "01:00",
            "1:00.0",
            "0000:01:00.8",
            "0000:01:20.0",
            "0000:01:00.0.1",
            "00000:01:00.0",
            "0:0000:01:00.0",
            "+1:00.0",
            "01:00.",
            "01:0g.0",
            "0000:01:00.0 ",
        ] {
            let err = bad.parse::<Bdf>().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{err} should name {bad:?}"
            );
        }
    }

    #[test]
    fn a_long_input_is_echoed_bounded() {
        let long = "0".repeat(100_000);
        let err = long.parse::<Bdf>().unwrap_err().to_string();
        assert!(err.len() < 256, "{err}");
        assert!(
            err.contains(&format!("{:?}… (100000 bytes)", &long[..64])),
            "{err}"
        );
        let multibyte = "é".repeat(100);
        let err = multibyte.parse::<Bdf>().unwrap_err().to_string();
        assert!(err.contains("(200 bytes)"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn display_round_trips(domain: u16, bus: u8, device in 0u8..32, function in 0u8..8) {
            let bdf = Bdf::new(domain, bus, device, function).unwrap();
            proptest::prop_assert_eq!(bdf.to_string().parse::<Bdf>().unwrap(), bdf);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,20}") {
            let _ = s.parse::<Bdf>();
        }
    }
}
