use serde::{Deserialize, Serialize};

/// Element type of tensors on the wire: f32; f16 / bf16 to halve an upload; int8 / int4
/// codes in blocks with a scale each (see [`crate::quantize`]) for about a quarter / an
/// eighth of it. The discriminants are the protocol's `ElementType` values (they are
/// hashed into digests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    #[default]
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    Int8 = 3,
    Int4 = 4,
}

impl ElementType {
    pub const ALL: [ElementType; 5] = [
        ElementType::F32,
        ElementType::F16,
        ElementType::Bf16,
        ElementType::Int8,
        ElementType::Int4,
    ];

    /// Bytes of `n` values in this type (with their scales, for int8 / int4).
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            ElementType::F32 => 4 * n,
            ElementType::F16 | ElementType::Bf16 => 2 * n,
            ElementType::Int8 | ElementType::Int4 => crate::quantize::encoded_len(self, n),
        }
    }

    /// How many values to encode together so their bytes fit in `max_bytes`: a whole
    /// number of blocks for int8 / int4, so every piece encodes on its own.
    pub fn values_within(self, max_bytes: usize) -> usize {
        match self {
            ElementType::Int8 | ElementType::Int4 => {
                let block = crate::quantize::BLOCK;
                (max_bytes / self.encoded_len(block)).max(1) * block
            }
            _ => (max_bytes / self.encoded_len(1)).max(1),
        }
    }

    /// Integer codes (int8, int4): lossy, rounded stochastically by senders.
    pub fn is_integer(self) -> bool {
        matches!(self, ElementType::Int8 | ElementType::Int4)
    }

    /// The protocol value.
    pub fn tag(self) -> i32 {
        self as i32
    }

    /// From a protocol value; `None` for one this build does not know.
    pub fn from_tag(tag: i32) -> Option<Self> {
        match tag {
            0 => Some(ElementType::F32),
            1 => Some(ElementType::F16),
            2 => Some(ElementType::Bf16),
            3 => Some(ElementType::Int8),
            4 => Some(ElementType::Int4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ElementType::F32 => "f32",
            ElementType::F16 => "f16",
            ElementType::Bf16 => "bf16",
            ElementType::Int8 => "int8",
            ElementType::Int4 => "int4",
        }
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ElementType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(ElementType::F32),
            "f16" => Ok(ElementType::F16),
            "bf16" => Ok(ElementType::Bf16),
            "int8" => Ok(ElementType::Int8),
            "int4" => Ok(ElementType::Int4),
            other => Err(format!(
                "unknown element type {other:?}: expected \"f32\", \"f16\", \"bf16\", \"int8\" or \"int4\""
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_and_serde_agree() {
        for e in ElementType::ALL {
            assert_eq!(e.as_str().parse::<ElementType>().unwrap(), e);
            assert_eq!(ElementType::from_tag(e.tag()), Some(e));
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.as_str()));
        }
        assert!("f8".parse::<ElementType>().is_err());
        assert_eq!(ElementType::from_tag(5), None);
    }
}
