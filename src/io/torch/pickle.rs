//! A restricted unpickler: it reads a pickle (protocols 0–5) into a tree of plain values and
//! executes nothing. Python's unpickler imports every global a pickle names and calls it; this one
//! only *simulates* the few calls a PyTorch checkpoint needs (see [`call`]): an OrderedDict, a
//! tensor rebuilt from its storage, a parameter, `torch.Size`, … Any other call is refused with the
//! global's name (`posix.system`, `builtins.eval`, …). Instantiating a class (NEWOBJ, OBJ, INST,
//! `copyreg._reconstructor`) never runs it either: the result is an [`Object`] record of the class
//! name, its arguments and the state BUILD gives it, which is how a whole pickled `nn.Module`
//! (`torch.save(model)`) is read as data.
//!
//! Storages come from the caller's `persistent_load` (the checkpoint format decides what a
//! persistent id means). Every read is bounds-checked; memo and stack grow at most with the input.

use super::{ElemType, StorageRef, TensorRef};
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A global a pickle names (`module.name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    pub module: String,
    pub name: String,
}

impl std::fmt::Display for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

/// An instance of a class, as data: never constructed, never run.
#[allow(dead_code)]
#[derive(Debug)]
pub struct Object {
    pub class: Rc<Global>,
    pub args: Value,
    /// What BUILD set (a module's `__dict__`: `_parameters`, `_buffers`, `_modules`, …).
    pub state: Value,
    /// Items SETITEMS/APPENDS added (a dict or list subclass).
    pub items: Vec<(Value, Value)>,
}

/// The tree keeps what the pickle said; some parts (floats, bytes, a record's arguments) only
/// reach messages through `Debug`.
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits: its little-endian two's-complement bytes.
    Long(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Set(Rc<RefCell<Vec<Value>>>),
    Global(Rc<Global>),
    Object(Rc<RefCell<Object>>),
    /// The result of a harmless call whose value nothing needs (`torch.device("cpu")`, a numpy
    /// scalar): only its callable's name is kept.
    Opaque(Rc<Global>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// The elements of a tuple or list.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.to_vec()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
    /// A dict's entry under a string key.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone()),
            _ => None,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::Long(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::Global(_) => "global",
            Value::Object(_) => "object",
            Value::Opaque(_) => "opaque value",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// What a persistent id stands for (a storage), decided by the checkpoint format.
pub type PersistentLoad<'a> = dyn FnMut(Value) -> Result<Value> + 'a;

/// Reads one pickle from the start of `data`; returns its value and the bytes it took (up to and
/// including STOP), so that consecutive pickles (the legacy format) can be read one after another.
pub fn load(data: &[u8], persistent_load: &mut PersistentLoad) -> Result<(Value, usize)> {
    let mut u = Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let v = u.run(persistent_load).map_err(|e| anyhow!("pickle, byte {}: {e:#}", u.pos))?;
    Ok((v, u.pos))
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).context("the pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn uint(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }
    fn len(&mut self, n: usize) -> Result<usize> {
        let l = self.uint(n)?;
        usize::try_from(l)
            .ok()
            .filter(|&l| l <= self.data.len() - self.pos)
            .context("a length runs past the pickle's end")
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&c| c == b'\n').context("a text field has no end of line")?;
        let s = std::str::from_utf8(&rest[..end]).context("a text field is not UTF-8")?;
        self.pos += end + 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            bail!("an opcode pops across a MARK");
        }
        self.stack.pop().context("stack underflow")
    }
    fn top(&self) -> Result<&Value> {
        self.stack.last().context("stack underflow")
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().context("no MARK to pop to")?;
        if m > self.stack.len() {
            bail!("a MARK lies above the stack");
        }
        Ok(self.stack.split_off(m))
    }
    fn str(s: &str) -> Value {
        Value::Str(Rc::from(s))
    }
    fn get_memo(&self, k: u64) -> Result<Value> {
        self.memo.get(&k).cloned().with_context(|| format!("memo {k} was never stored"))
    }
    fn put_memo(&mut self, k: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(k, v);
        Ok(())
    }
    /// A global, its module under Python 3's name (protocols 0–2 write Python 2's, which
    /// Python's unpickler maps the same way).
    fn global(module: &str, name: &str) -> Value {
        let module = match module {
            "__builtin__" => "builtins",
            "copy_reg" => "copyreg",
            m => m,
        };
        Value::Global(Rc::new(Global { module: module.into(), name: name.into() }))
    }

    fn run(&mut self, persistent_load: &mut PersistentLoad) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        bail!("pickle protocol {p} is newer than 5");
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    // POP at a MARK's level pops the mark (as Python does).
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.len(1)? } else { self.len(4)? };
                    let b = self.take(n)?;
                    self.stack.push(long(b));
                }
                b'I' | b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = match s {
                        "01" if op == b'I' => Value::Bool(true),
                        "00" if op == b'I' => Value::Bool(false),
                        _ => Value::Int(s.parse().with_context(|| format!("integer {s:?}"))?),
                    };
                    self.stack.push(v);
                }
                b'F' => {
                    let s = self.line()?;
                    self.stack.push(Value::Float(s.parse().with_context(|| format!("float {s:?}"))?));
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack.push(Value::Float(f64::from_be_bytes(b.try_into().unwrap())));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.len(4)?,
                        0x8c => self.len(1)?,
                        _ => self.len(8)?,
                    };
                    let s = std::str::from_utf8(self.take(n)?).context("a string is not UTF-8")?;
                    self.stack.push(Self::str(s));
                }
                b'V' => {
                    let s = self.line()?;
                    self.stack.push(Self::str(&raw_unicode_unescape(s)));
                }
                b'S' => {
                    let s = self.line()?;
                    let inner = s
                        .strip_prefix('\'')
                        .and_then(|t| t.strip_suffix('\''))
                        .or_else(|| s.strip_prefix('"').and_then(|t| t.strip_suffix('"')))
                        .context("STRING is not quoted")?;
                    self.stack.push(Self::str(inner));
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'U' | b'C' => self.len(1)?,
                        b'T' | b'B' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?;
                    // Python 2 strings (T, U) are bytes; checkpoints use them for names only.
                    self.stack.push(match (op, std::str::from_utf8(b)) {
                        (b'T' | b'U', Ok(s)) => Self::str(s),
                        _ => Value::Bytes(Rc::from(b)),
                    });
                }
                b')' => self.stack.push(Value::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                b']' => self.stack.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::default());
                    set_items(&d, pairs(items)?)?;
                    self.stack.push(d);
                }
                0x8f => self.stack.push(Value::Set(Rc::default())),
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Set(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    append(self.top()?, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    append(self.top()?, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    set_items(self.top()?, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    set_items(self.top()?, pairs(items)?)?;
                }
                b'g' => {
                    let k = self.line()?.parse().context("GET index")?;
                    let v = self.get_memo(k)?;
                    self.stack.push(v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { self.uint(1)? } else { self.uint(4)? };
                    let v = self.get_memo(k)?;
                    self.stack.push(v);
                }
                b'p' => {
                    let k = self.line()?.parse().context("PUT index")?;
                    self.put_memo(k)?;
                }
                b'q' | b'r' => {
                    let k = if op == b'q' { self.uint(1)? } else { self.uint(4)? };
                    self.put_memo(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.put_memo(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Self::global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => self.stack.push(Self::global(m, n)),
                        _ => bail!("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = match f {
                        Value::Global(g) => call(&g, args)?,
                        other => bail!("REDUCE calls a {}, not a named global", other.kind()),
                    };
                    self.stack.push(v);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(instance(cls, args)?);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        bail!("OBJ without a class");
                    }
                    let cls = items.remove(0);
                    self.stack.push(instance(cls, Value::Tuple(Rc::from(items)))?);
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let items = self.pop_mark()?;
                    self.stack.push(instance(Self::global(module, name), Value::Tuple(Rc::from(items)))?);
                }
                b'b' => {
                    let state = self.pop()?;
                    // A record keeps its state; other values (an OrderedDict's `_metadata`, a
                    // tensor's Python attributes) have nothing to run it on.
                    if let Value::Object(o) = self.top()? {
                        o.borrow_mut().state = state;
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?);
                }
                b'P' => {
                    let pid = self.line()?;
                    self.stack.push(persistent_load(Self::str(pid))?);
                }
                0x82..=0x84 => bail!("extension-registry opcodes (EXT1/2/4) are not read"),
                0x97 | 0x98 => bail!("out-of-band buffers (protocol 5) are not read"),
                other => bail!("unknown opcode 0x{other:02x}"),
            }
        }
    }
}

/// An integer from little-endian two's-complement bytes.
fn long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = [if neg { 0xff } else { 0 }; 8];
        buf[..b.len()].copy_from_slice(b);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::Long(Rc::from(b))
}

fn raw_unicode_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some('u' | 'U')) {
            let n = if chars.next() == Some('u') { 4 } else { 8 };
            let hex: String = chars.by_ref().take(n).collect();
            match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                Some(ch) => out.push(ch),
                None => out.push_str(&hex),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        bail!("an odd number of items for a dict");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn set_items(target: &Value, items: Vec<(Value, Value)>) -> Result<()> {
    match target {
        Value::Dict(d) => {
            let mut d = d.borrow_mut();
            for (k, v) in items {
                // A repeated key replaces the earlier value, as in Python.
                match d.iter_mut().find(|(old, _)| same_key(old, &k)) {
                    Some(slot) => slot.1 = v,
                    None => d.push((k, v)),
                }
            }
        }
        Value::Object(o) => o.borrow_mut().items.extend(items),
        other => bail!("SETITEM on a {}", other.kind()),
    }
    Ok(())
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn append(target: &Value, items: Vec<Value>) -> Result<()> {
    match target {
        Value::List(l) => l.borrow_mut().extend(items),
        Value::Set(s) => s.borrow_mut().extend(items),
        Value::Object(o) => o.borrow_mut().items.extend(items.into_iter().map(|v| (Value::None, v))),
        other => bail!("APPEND on a {}", other.kind()),
    }
    Ok(())
}

/// A class instantiated as a record (never constructed).
fn instance(cls: Value, args: Value) -> Result<Value> {
    match cls {
        Value::Global(class) => {
            // Containers some pickles build through NEWOBJ: the container itself.
            if is_dict_class(&class) {
                return Ok(Value::Dict(Rc::default()));
            }
            Ok(Value::Object(Rc::new(RefCell::new(Object { class, args, state: Value::None, items: Vec::new() }))))
        }
        other => bail!("a class instance of a {}, not a named class", other.kind()),
    }
}

fn is_dict_class(g: &Global) -> bool {
    matches!((g.module.as_str(), g.name.as_str()), ("collections", "OrderedDict") | ("builtins", "dict"))
}

fn arg(args: &[Value], i: usize, what: &str) -> Result<Value> {
    args.get(i).cloned().with_context(|| format!("missing argument {i} ({what})"))
}

fn usize_list(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.items()
        .with_context(|| format!("{what} is a {}, not a tuple", v.kind()))?
        .iter()
        .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()).with_context(|| format!("{what}: not a size")))
        .collect()
}

/// The callables a checkpoint may name, simulated; any other is refused by name.
fn call(g: &Rc<Global>, args: Value) -> Result<Value> {
    let a = args.items().with_context(|| format!("{g}: arguments are a {}, not a tuple", args.kind()))?;
    let opaque = || Ok(Value::Opaque(g.clone()));
    match (g.module.as_str(), g.name.as_str()) {
        _ if is_dict_class(g) => {
            let d = Value::Dict(Rc::default());
            if let Some(items) = a.first().and_then(Value::items) {
                let kv = items.iter().map(|p| match p.items().as_deref() {
                    Some([k, v]) => Ok((k.clone(), v.clone())),
                    _ => bail!("{g}: an item is not a pair"),
                });
                set_items(&d, kv.collect::<Result<_>>()?)?;
            }
            Ok(d)
        }
        ("builtins", "set" | "frozenset") => {
            Ok(Value::Set(Rc::new(RefCell::new(a.first().and_then(Value::items).unwrap_or_default()))))
        }
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
            let storage = match arg(&a, 0, "storage")? {
                Value::Storage(s) => s,
                other => bail!("{g}: argument 0 is a {}, not a storage", other.kind()),
            };
            let offset = arg(&a, 1, "storage offset")?.as_int().and_then(|i| usize::try_from(i).ok());
            let offset = offset.with_context(|| format!("{g}: the storage offset is not a size"))?;
            let shape = usize_list(&arg(&a, 2, "size")?, "size")?;
            let stride = usize_list(&arg(&a, 3, "stride")?, "stride")?;
            if shape.len() != stride.len() {
                bail!("{g}: size {shape:?} and stride {stride:?} differ in length");
            }
            // v3 (untyped storage): the element type is an argument.
            let dtype = if g.name == "_rebuild_tensor_v3" {
                match arg(&a, 6, "dtype")? {
                    Value::Global(d) => {
                        ElemType::from_dtype_name(&d.name).with_context(|| format!("{g}: dtype {d}"))?
                    }
                    other => bail!("{g}: the dtype is a {}", other.kind()),
                }
            } else {
                storage.dtype
            };
            Ok(Value::Tensor(Rc::new(TensorRef { storage, dtype, offset, shape, stride })))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
        | ("torch.nn.parameter", "Parameter") => arg(&a, 0, "data"),
        ("torch._utils" | "torch._tensor", "_rebuild_from_type_v2") => {
            match (arg(&a, 0, "function")?, arg(&a, 2, "args")?) {
                (Value::Global(f), inner) => call(&f, inner),
                _ => bail!("{g}: argument 0 is not a named function"),
            }
        }
        ("torch", "Size") => Ok(Value::Tuple(Rc::from(a.first().and_then(Value::items).unwrap_or_default()))),
        ("copyreg", "_reconstructor") => instance(arg(&a, 0, "class")?, Value::None),
        ("_codecs", "encode") => match a.first() {
            // Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
            Some(Value::Str(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect::<Vec<u8>>().into())),
            _ => bail!("{g}: argument 0 is not a string"),
        },
        // Values nothing reads, from calls with no effect: the function backend of torch < 1.5
        // modules, devices, numpy scalars and arrays (a Lightning checkpoint's callback state),
        // paths.
        ("torch.nn.backends.thnn", "_get_thnn_function_backend")
        | ("torch", "device")
        | ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar" | "_reconstruct")
        | ("numpy", "dtype")
        | ("pathlib", "PosixPath" | "WindowsPath" | "PurePosixPath" | "PureWindowsPath") => opaque(),
        _ => bail!(
            "refuses to call {g}: a checkpoint needs only tensors, containers and the torch rebuild functions, \
             and roentgen runs no code from a file"
        ),
    }
}
