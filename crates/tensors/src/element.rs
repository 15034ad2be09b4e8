use serde::{Deserialize, Serialize};

/// Element type of tensors on the wire: f32, or f16 / bf16 to halve an upload. The
/// discriminants are the protocol's `ElementType` values (they are hashed into digests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    #[default]
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl ElementType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::Bf16 => 2,
        }
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
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ElementType::F32 => "f32",
            ElementType::F16 => "f16",
            ElementType::Bf16 => "bf16",
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
            other => Err(format!(
                "unknown element type {other:?}: expected \"f32\", \"f16\" or \"bf16\""
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_and_serde_agree() {
        for e in [ElementType::F32, ElementType::F16, ElementType::Bf16] {
            assert_eq!(e.as_str().parse::<ElementType>().unwrap(), e);
            assert_eq!(ElementType::from_tag(e.tag()), Some(e));
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.as_str()));
        }
        assert!("f8".parse::<ElementType>().is_err());
        assert_eq!(ElementType::from_tag(3), None);
    }
}
