//! Reading a diffusers `scheduler_config.json` the way `SchedulerMixin.from_config` does: every field
//! a scheduler's `__init__` takes comes from the config when present and from the class default
//! otherwise; fields the class does not take (e.g. PNDM's `skip_prk_steps` when the SD v1.4 config
//! is loaded into an Euler scheduler) are ignored, as diffusers ignores them.
//!
//! Every error names the config file, the field and the value. `null` means "absent" (diffusers'
//! `None`), except for booleans, where it is false (Python's truthiness of `None`, which is how
//! diffusers reads e.g. `"use_karras_sigmas": null`).
//!
//! `_use_default_values` (the fields a scheduler was *not* given, which diffusers records in a loaded
//! scheduler's `config` and drops when saving): `extract_init_dict` removes the fields it lists
//! before anything else, so a scheduler built `from_config(other.config)` takes its *own* class
//! defaults for them, not the other class's. E.g. a PNDM config without `set_alpha_to_one`, loaded
//! as PNDM (default false) and passed on as `pipe.scheduler.config`, gives DDIM its default true.
//!
//! Sizes are bounded before anything is allocated from them (see [`Config::int_in`]).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// One scheduler's view of a config: the JSON object (with any overrides merged in), where it came
/// from, and the diffusers class it is being read for.
pub(crate) struct Config {
    map: Map<String, Value>,
    path: PathBuf,
    class: &'static str,
}

impl Config {
    /// `config` must be a JSON object; `overrides` replace its fields (as keyword arguments to
    /// diffusers' `from_config(config, **kwargs)` do).
    pub(crate) fn new(
        config: &Value,
        overrides: &Map<String, Value>,
        path: &Path,
        class: &'static str,
    ) -> Result<Config> {
        let Some(obj) = config.as_object() else {
            bail!("{}: a scheduler config must be a JSON object, got {}", path.display(), short(config));
        };
        let mut map = obj.clone();
        // diffusers' extract_init_dict: `config_dict = {k: v for k, v in config_dict.items() if k not
        // in used_defaults and k != "_use_default_values"}`, before the keyword overrides apply.
        if let Some(used) = map.remove("_use_default_values") {
            let names = match &used {
                Value::Null => Vec::new(),
                Value::Array(a) if a.iter().all(Value::is_string) => {
                    a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
                }
                v => bail!("{}: _use_default_values: expected a list of field names, got {}", path.display(), short(v)),
            };
            for name in names {
                map.remove(&name);
            }
        }
        for (k, v) in overrides {
            map.insert(k.clone(), v.clone());
        }
        Ok(Config { map, path: path.to_path_buf(), class })
    }

    pub(crate) fn class(&self) -> &'static str {
        self.class
    }

    /// An error about `field` (its value is quoted by the caller where useful).
    pub(crate) fn error(&self, field: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: {field}: {msg} ({})", self.path.display(), self.class)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| self.error(field, format!("expected a number, got {}", short(v))))
            }
        }
    }

    pub(crate) fn f64(&self, field: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(field)?.unwrap_or(default))
    }

    /// An integer. Integral floats (`1000.0`) are accepted; integers beyond ±2⁵³ are errors (they
    /// are not sizes any scheduler can use, and the caller bounds them further with [`Config::int_in`]).
    pub(crate) fn i64(&self, field: &str, default: i64) -> Result<i64> {
        const LIMIT: f64 = 9.0e15;
        match self.get(field) {
            None => Ok(default),
            Some(v) => {
                if let Some(i) = v.as_i64().filter(|i| (*i as f64).abs() < LIMIT) {
                    return Ok(i);
                }
                match v.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < LIMIT => Ok(f as i64),
                    Some(f) if f.fract() == 0.0 => Err(self.error(field, format!("{} is out of range", short(v)))),
                    _ => Err(self.error(field, format!("expected an integer, got {}", short(v)))),
                }
            }
        }
    }

    /// An integer in `lo..=hi`, checked before the caller sizes anything by it (e.g.
    /// `num_train_timesteps` of 2³¹ would otherwise allocate tables of gigabytes, or abort).
    pub(crate) fn int_in(&self, field: &str, default: i64, lo: i64, hi: i64) -> Result<i64> {
        let out_of_range =
            |shown: String| self.error(field, format!("{shown} is out of range (must be between {lo} and {hi})"));
        let Some(v) = self.get(field) else { return Ok(default) };
        let i = match (v.as_i64(), v.as_f64()) {
            (Some(i), _) => i,
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
            // An integral number beyond i64 (2^63 and up, 1e30): out of range, not "not an integer".
            (None, Some(f)) if f.fract() == 0.0 => return Err(out_of_range(short(v))),
            _ => return Err(self.error(field, format!("expected an integer, got {}", short(v)))),
        };
        if i < lo || i > hi {
            return Err(out_of_range(i.to_string()));
        }
        Ok(i)
    }

    /// A positive integer (e.g. `solver_order`, whose caller then says which values it supports).
    pub(crate) fn positive(&self, field: &str, default: i64) -> Result<usize> {
        let v = self.i64(field, default)?;
        if v < 1 {
            return Err(self.error(field, format!("must be a positive integer, got {v}")));
        }
        usize::try_from(v).map_err(|_| self.error(field, format!("{v} is too large")))
    }

    pub(crate) fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.map.get(field) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(field, format!("expected true or false, got {}", short(v)))),
        }
    }

    /// A string field, `None` when absent or null.
    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(field, format!("expected a string, got {}", short(v)))),
        }
    }

    /// A string field restricted to `choices` (`(json value, parsed)`); absent or null gives `default`.
    pub(crate) fn choice<T: Copy>(&self, field: &str, default: T, choices: &[(&str, T)]) -> Result<T> {
        let Some(s) = self.opt_str(field)? else { return Ok(default) };
        choices.iter().find(|(name, _)| *name == s).map(|&(_, t)| t).ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            self.unsupported(field, &Value::String(s.to_string()), &names.join(", "))
        })
    }

    /// "`field` = value is not supported" with what is.
    pub(crate) fn unsupported(&self, field: &str, value: &Value, supported: &str) -> anyhow::Error {
        self.error(field, format!("unsupported value {} (roentgen supports: {supported})", short(value)))
    }

    /// Fields roentgen does not implement: they must be absent, null, or the given neutral value.
    pub(crate) fn require_default(&self, field: &str, neutral: &Value, supported: &str) -> Result<()> {
        match self.get(field) {
            None => Ok(()),
            Some(v) if v == neutral => Ok(()),
            Some(v) => Err(self.unsupported(field, v, supported)),
        }
    }
}

/// A value for an error message, shortened (a `trained_betas` list can be long).
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}
