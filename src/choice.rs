//! Settings whose values are words (`--device cuda`, `"on_bad_image": "skip"`): one macro writes
//! the enum, its parser and its name, so every such setting accepts, spells and refuses alike.

/// Declares an enum of settings chosen by word:
/// `word_enum!(/// docs \n pub enum Device("device") { Cpu = "cpu", Cuda = "cuda" | "gpu" });`
/// gives the enum (Clone, Copy, Debug, PartialEq, Eq, Hash), `ALL`, `name()` (the first word),
/// `Display` (the same) and `FromStr`, which takes any of a value's words case-insensitively and,
/// when it refuses, names the setting and every value (`unknown device "tpu" (expected one of cpu,
/// cuda)`).
macro_rules! word_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident ($what:literal) {
        $($(#[$vmeta:meta])* $variant:ident = $first:literal $(| $alt:literal)*),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value's word (the first it accepts).
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $first),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($first $(| $alt)* => Ok($name::$variant),)+
                    _ => Err(format!(
                        "unknown {} {s:?} (expected one of {})",
                        $what,
                        $name::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::backend::Device;
    use crate::tools::bench::Stage;

    #[test]
    fn any_word_of_a_value_parses_and_the_first_names_it() {
        assert_eq!("GPU".parse::<Device>(), Ok(Device::Cuda));
        assert_eq!("vae".parse::<Stage>(), Ok(Stage::VaeDecode));
        assert_eq!(Stage::VaeDecode.to_string(), "vae-decode");
        assert_eq!(Stage::ALL.len(), 5);
        assert_eq!("train".parse::<Stage>(), Ok(Stage::TrainStep));
    }

    #[test]
    fn a_refusal_names_the_setting_and_every_value() {
        let err = "tpu".parse::<Device>().unwrap_err();
        assert_eq!(err, "unknown device \"tpu\" (expected one of cpu, cuda)");
    }
}

/// The word of a value of a `clap::ValueEnum` setting, as its flag spells it (`u-ones`, `pad`):
/// the settings declared with clap's derive rather than [`word_enum!`] (those whose values carry
/// their own help in `--help`).
pub fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map_or_else(String::new, |p| p.get_name().to_string())
}
