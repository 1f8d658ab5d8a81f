//! Coupled channel groups, derived from the graph's channel relations alone.
//!
//! Every node output is a row of channel *slots*. The relations of [`Graph::channel_map`]
//! say which slots are the same channel seen at different places: an identity op (batch norm,
//! activation, pooling, depthwise conv, add, channel-wise multiply) ties output `c` to
//! channel `c` of every input, a concat ties its ranges to its inputs, a slice and a
//! permutation tie each output to one input channel, and a flatten that follows a global
//! average pool is an identity. A union-find over the slots joined by these relations gives
//! *channel classes*: sets of slots that must disappear together.
//!
//! A class can be removed only if none of its slots is the network input, the network output,
//! or a flatten whose features are not one per channel. Two kinds of op constrain which sets
//! of classes may go:
//!
//! * A channel shuffle with `g` groups must stay a channel shuffle with `g` groups. Its input
//!   is `g` rows of `C/g`; removing the same positions from every row keeps the permutation
//!   exact and order-preserving, so position `p` of every row is tied into one class.
//! * A grouped conv (`groups > 1`) keeps equal group sizes, so every removal must take the
//!   same number of channels from each group of its output and of its input. These are
//!   balance constraints; classes are merged into a [`PruneUnit`] until every constraint the
//!   unit touches is balanced. Balance is additive, so any union of units is balanced too.
//!
//! Merging is a search, smallest units first: a greedy pass that balances the constraints in
//! graph order (upstream first, the most constrained group first), and, where the greedy
//! pass finds nothing, an exact one: the balance constraints are a homogeneous linear system
//! in the number of classes taken from each set of interchangeable classes, so the smallest
//! rational solution of a linear program, scaled to integers, is a unit (checked exactly).
//! ShuffleNet V1's residual stream needs the exact search: its concat of a pooled shortcut
//! with a grouped branch makes some units span a third of the stream.
//!
//! The result is a list of independent units: any subset can be removed at once (as long as
//! no node loses all its channels), and each unit lists the parameters it takes with it.

use super::lp;
use crate::graph::{ChannelMap, Graph, NodeId, Op};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What a removed channel takes with it in one node's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// An output channel of a conv or linear layer that creates new channels: its weight row
    /// and bias entry. These are the filters an importance score looks at.
    Filter,
    /// A channel of a depthwise conv: its filter and bias entry (input and output channel
    /// go together).
    Depthwise,
    /// A channel of a batch norm: weight, bias, running mean and running variance entries.
    Norm,
    /// An input channel of a conv or linear layer: its weight column (within its group for a
    /// grouped conv). `channel` is the index in the layer's full input.
    Column,
}

/// One parameter slice of a unit: channel `channel` of node `node`, in the given role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub node: NodeId,
    pub channel: usize,
    pub role: Role,
}

/// A set of channels that can only be removed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneUnit {
    /// Every output channel that disappears, as (node, channel), sorted. Parameter-free nodes
    /// (activations, pools, concat, shuffle ...) are included.
    pub slots: Vec<(NodeId, usize)>,
    /// The parameter slices that disappear with them, sorted by node, channel and role.
    pub members: Vec<Member>,
}

impl PruneUnit {
    /// The filters (conv or linear output channels) the unit removes, for importance scores.
    pub fn filters(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.role == Role::Filter)
    }

    /// Number of output channels removed from node `node`.
    pub fn removed_from(&self, node: NodeId) -> usize {
        self.slots.iter().filter(|(n, _)| *n == node).count()
    }

    /// The distinct nodes whose output channels the unit removes, in graph order.
    pub fn nodes(&self) -> Vec<NodeId> {
        let set: BTreeSet<NodeId> = self.slots.iter().map(|(n, _)| *n).collect();
        set.into_iter().collect()
    }

    /// A one-line description: every conv or linear layer the unit touches with the channels
    /// it loses, e.g. `features.1.conv.0.0[3] features.2.conv.0.0[in 3]`.
    pub fn describe(&self, graph: &Graph) -> String {
        let mut lists: BTreeMap<(NodeId, bool), Vec<String>> = BTreeMap::new();
        for m in self.members.iter().filter(|m| m.role != Role::Norm) {
            lists
                .entry((m.node, m.role == Role::Column))
                .or_default()
                .push(m.channel.to_string());
        }
        let parts: Vec<String> = lists
            .into_iter()
            .map(|((node, column), channels)| {
                let prefix = if column { "in " } else { "" };
                format!("{}[{prefix}{}]", graph.nodes[node].name, channels.join(","))
            })
            .collect();
        parts.join(" ")
    }
}

/// Why channel classes cannot be removed, counted per class (first reason that applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocked {
    /// The class contains a channel of the network input.
    pub input: usize,
    /// The class contains a channel of the network output (the logits).
    pub output: usize,
    /// The class reaches a flatten whose features are not one per channel.
    pub flatten: usize,
    /// The class passes through a permutation this module cannot shrink.
    pub unsupported: usize,
    /// Removable on its own terms, but in no unit: no set balanced for every grouped conv
    /// was found (or exists), or the only one would leave some node without channels.
    pub no_unit: usize,
}

/// The result of [`analyze`].
#[derive(Debug, Clone)]
pub struct ChannelGroups {
    /// Independent removable units, in graph order of their first channel.
    pub units: Vec<PruneUnit>,
    /// Number of channel classes (union-find equivalence classes) in the graph.
    pub classes: usize,
    pub blocked: Blocked,
}

/// The removable units of `graph`; see [`analyze`].
pub fn channel_groups(graph: &Graph) -> Result<Vec<PruneUnit>> {
    Ok(analyze(graph)?.units)
}

/// Union-find with path halving and union by size.
pub(crate) struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    pub(crate) fn new(n: usize) -> Self {
        UnionFind {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    pub(crate) fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    pub(crate) fn union(&mut self, a: usize, b: usize) {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return;
        }
        if self.size[a] < self.size[b] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b] = a;
        self.size[a] += self.size[b];
    }
}

/// Whether the flatten `node` turns each channel into exactly one feature: its input comes
/// from a global average pool through per-channel ops only.
pub(crate) fn flatten_is_per_channel(graph: &Graph, node: NodeId) -> bool {
    let mut id = graph.nodes[node].inputs[0];
    loop {
        match graph.nodes[id].op {
            Op::GlobalAvgPool => return true,
            Op::Act { .. } | Op::Dropout { .. } | Op::BatchNorm { .. } => {
                id = graph.nodes[id].inputs[0]
            }
            _ => return false,
        }
    }
}

/// Why a slot can never be removed; lower values take precedence in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Block {
    Input = 1,
    Output = 2,
    Flatten = 3,
    Unsupported = 4,
}

/// A balance constraint: node `node`'s channels in `groups` equal contiguous blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Partition {
    node: NodeId,
    groups: usize,
}

/// Largest number of classes one unit may merge before the search gives up on its seed.
const MAX_CLASSES_PER_UNIT: usize = 4096;

/// Derives the channel classes and the removable units of `graph`.
pub fn analyze(graph: &Graph) -> Result<ChannelGroups> {
    graph.validate()?;
    let counts = graph.channel_counts()?;
    let n_nodes = graph.nodes.len();
    let mut base = Vec::with_capacity(n_nodes + 1);
    base.push(0usize);
    for &c in &counts {
        base.push(base.last().unwrap() + c);
    }
    let total = base[n_nodes];
    let slot = |node: NodeId, c: usize| base[node] + c;
    let maps: Vec<ChannelMap> = (0..n_nodes)
        .map(|id| graph.channel_map(id, &counts))
        .collect();

    let mut uf = UnionFind::new(total);
    let mut blocked: Vec<Option<Block>> = vec![None; total];
    let block = |blocked: &mut Vec<Option<Block>>, node: NodeId, why: Block| {
        for b in &mut blocked[base[node]..base[node + 1]] {
            *b = Some(b.map_or(why, |old| old.min(why)));
        }
    };
    let mut partitions: BTreeSet<Partition> = BTreeSet::new();
    for (id, node) in graph.nodes.iter().enumerate() {
        match &maps[id] {
            ChannelMap::Source => block(&mut blocked, id, Block::Input),
            ChannelMap::Identity => {
                for &input in &node.inputs {
                    for c in 0..counts[id] {
                        uf.union(slot(id, c), slot(input, c));
                    }
                }
            }
            ChannelMap::Grouped { groups } => {
                if *groups > 1 {
                    partitions.insert(Partition {
                        node: id,
                        groups: *groups,
                    });
                    partitions.insert(Partition {
                        node: node.inputs[0],
                        groups: *groups,
                    });
                }
            }
            ChannelMap::Concat { offsets } => {
                for (k, &input) in node.inputs.iter().enumerate() {
                    for c in 0..counts[input] {
                        uf.union(slot(id, offsets[k] + c), slot(input, c));
                    }
                }
            }
            ChannelMap::Slice { start } => {
                for c in 0..counts[id] {
                    uf.union(slot(id, c), slot(node.inputs[0], start + c));
                }
            }
            ChannelMap::Permute(perm) => {
                let input = node.inputs[0];
                for (i, &p) in perm.iter().enumerate() {
                    uf.union(slot(id, i), slot(input, p));
                }
                match node.op {
                    Op::ChannelShuffle { groups } if groups > 0 => {
                        // Same position in every row, so the smaller shuffle stays exact.
                        let per_row = counts[input] / groups;
                        for row in 1..groups {
                            for p in 0..per_row {
                                uf.union(slot(input, row * per_row + p), slot(input, p));
                            }
                        }
                    }
                    _ => {
                        block(&mut blocked, id, Block::Unsupported);
                        block(&mut blocked, input, Block::Unsupported);
                    }
                }
            }
            ChannelMap::Flatten => {
                let input = node.inputs[0];
                for c in 0..counts[id] {
                    uf.union(slot(id, c), slot(input, c));
                }
                if !flatten_is_per_channel(graph, id) {
                    block(&mut blocked, id, Block::Flatten);
                }
            }
        }
    }
    block(&mut blocked, graph.output, Block::Output);

    // Classes, numbered in order of their first slot (graph order).
    let mut class_of_root = vec![usize::MAX; total];
    let mut class_of = vec![0usize; total];
    let mut class_slots: Vec<Vec<usize>> = Vec::new();
    let mut class_block: Vec<Option<Block>> = Vec::new();
    for s in 0..total {
        let r = uf.find(s);
        if class_of_root[r] == usize::MAX {
            class_of_root[r] = class_slots.len();
            class_slots.push(Vec::new());
            class_block.push(None);
        }
        let k = class_of_root[r];
        class_of[s] = k;
        class_slots[k].push(s);
        if let Some(b) = blocked[s] {
            class_block[k] = Some(class_block[k].map_or(b, |old| old.min(b)));
        }
    }
    let n_classes = class_slots.len();
    // A class with no filter has nothing that creates it: it cannot be removed.
    let node_of_slot = |s: usize| base.partition_point(|&b| b <= s) - 1;
    let has_filter: Vec<bool> = class_slots
        .iter()
        .map(|slots| {
            slots.iter().any(|&s| {
                let node = node_of_slot(s);
                matches!(maps[node], ChannelMap::Grouped { .. })
            })
        })
        .collect();

    // Balance constraints: which block of which partition each class touches. Partitions
    // that constrain the same classes in the same way (a conv's output and the add after it,
    // the next conv's input ...) are one constraint.
    let mut constraints: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut seen: HashMap<Vec<(usize, usize)>, usize> = HashMap::new();
    for part in &partitions {
        let per_block = counts[part.node] / part.groups;
        let mut pattern: Vec<(usize, usize)> = (0..counts[part.node])
            .map(|c| (class_of[slot(part.node, c)], c / per_block))
            .collect();
        pattern.sort_unstable();
        if !seen.contains_key(&pattern) {
            seen.insert(pattern.clone(), constraints.len());
            constraints.push(pattern);
        }
    }
    let groups_of: Vec<usize> = constraints
        .iter()
        .map(|pattern| pattern.iter().map(|h| h.1).max().unwrap_or(0) + 1)
        .collect();
    let mut class_hits: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n_classes];
    for (cid, pattern) in constraints.iter().enumerate() {
        for &(k, b) in pattern {
            class_hits[k].push((cid, b));
        }
    }
    let eligible: Vec<bool> = (0..n_classes)
        .map(|k| class_block[k].is_none() && has_filter[k])
        .collect();
    // Classes that touch the same blocks of the same constraints are interchangeable: atoms.
    let mut atoms: Vec<Atom> = Vec::new();
    let mut atom_of = vec![usize::MAX; n_classes];
    let mut atom_index: HashMap<&[(usize, usize)], usize> = HashMap::new();
    for k in 0..n_classes {
        if !eligible[k] || class_hits[k].is_empty() {
            continue;
        }
        let a = *atom_index.entry(&class_hits[k]).or_insert_with(|| {
            atoms.push(Atom {
                hits: class_hits[k].clone(),
                classes: Vec::new(),
            });
            atoms.len() - 1
        });
        atoms[a].classes.push(k);
        atom_of[k] = a;
    }
    let mut block_atoms: Vec<Vec<Vec<usize>>> =
        groups_of.iter().map(|&g| vec![Vec::new(); g]).collect();
    for (a, atom) in atoms.iter().enumerate() {
        for &(cid, b) in &atom.hits {
            if block_atoms[cid][b].last() != Some(&a) {
                block_atoms[cid][b].push(a);
            }
        }
    }
    let search = Balance {
        groups_of: &groups_of,
        atoms: &atoms,
        block_atoms: &block_atoms,
    };

    let mut taken = vec![false; n_classes];
    let mut units: Vec<PruneUnit> = Vec::new();
    // Turns a set of classes into a unit, unless it would empty a node on its own.
    let make_unit = |classes: &[usize]| -> Option<PruneUnit> {
        let mut slots: Vec<usize> = classes
            .iter()
            .flat_map(|&k| class_slots[k].iter().copied())
            .collect();
        slots.sort_unstable();
        let slots: Vec<(NodeId, usize)> = slots
            .into_iter()
            .map(|s| {
                let node = node_of_slot(s);
                (node, s - base[node])
            })
            .collect();
        let mut per_node = vec![0usize; n_nodes];
        for &(node, _) in &slots {
            per_node[node] += 1;
        }
        if per_node.iter().zip(&counts).any(|(&r, &c)| r > 0 && r >= c) {
            return None;
        }
        Some(PruneUnit {
            members: members_of(graph, &maps, &slots),
            slots,
        })
    };
    // Unconstrained classes are units on their own.
    for k in 0..n_classes {
        if eligible[k]
            && class_hits[k].is_empty()
            && let Some(unit) = make_unit(&[k])
        {
            taken[k] = true;
            units.push(unit);
        }
    }
    // Constrained ones are merged into balanced units, smallest first: each pass allows
    // larger units than the one before.
    let mut free: Vec<usize> = atoms.iter().map(|a| a.classes.len()).collect();
    let mut generation = 0usize;
    let mut exact_cache: Vec<Option<(usize, Option<Take>)>> = vec![None; atoms.len()];
    for cap in [8, 64, 512, MAX_CLASSES_PER_UNIT] {
        let mut failed = vec![false; atoms.len()];
        for seed in 0..n_classes {
            let a = atom_of[seed];
            if a == usize::MAX || taken[seed] || failed[a] {
                continue;
            }
            // The greedy search first; the exact one when the greedy finds nothing usable.
            let mut made = None;
            for exact in [false, true] {
                let take = if exact {
                    if exact_cache[a]
                        .as_ref()
                        .is_none_or(|(g, _)| *g != generation)
                    {
                        exact_cache[a] = Some((generation, search.exact(a, &free)));
                    }
                    exact_cache[a]
                        .as_ref()
                        .and_then(|(_, r)| r.clone())
                        .filter(|take| take.iter().map(|t| t.1).sum::<usize>() <= cap)
                } else {
                    search.grow(a, cap, &free)
                };
                let Some(take) = take else { continue };
                let classes: Vec<usize> = take
                    .iter()
                    .flat_map(|&(atom, n)| {
                        atoms[atom]
                            .classes
                            .iter()
                            .copied()
                            .filter(|&k| !taken[k])
                            .take(n)
                    })
                    .collect();
                if let Some(unit) = make_unit(&classes) {
                    made = Some((take, classes, unit));
                    break;
                }
            }
            let Some((take, classes, unit)) = made else {
                failed[a] = true;
                continue;
            };
            for &k in &classes {
                taken[k] = true;
            }
            for &(atom, n) in &take {
                free[atom] -= n;
            }
            generation += 1;
            units.push(unit);
        }
    }
    units.sort_by(|a, b| a.slots[0].cmp(&b.slots[0]));

    let mut blocked_report = Blocked::default();
    for k in 0..n_classes {
        match class_block[k] {
            Some(Block::Input) => blocked_report.input += 1,
            Some(Block::Output) => blocked_report.output += 1,
            Some(Block::Flatten) => blocked_report.flatten += 1,
            Some(Block::Unsupported) => blocked_report.unsupported += 1,
            None if eligible[k] && !taken[k] => blocked_report.no_unit += 1,
            None => {}
        }
    }
    Ok(ChannelGroups {
        units,
        classes: n_classes,
        blocked: blocked_report,
    })
}

/// The parameter slices that go with a set of removed output slots.
fn members_of(graph: &Graph, maps: &[ChannelMap], slots: &[(NodeId, usize)]) -> Vec<Member> {
    let consumers = graph.consumers();
    let mut members = BTreeSet::new();
    for &(node, channel) in slots {
        let role = match (&graph.nodes[node].op, &maps[node]) {
            (Op::Conv2d { .. }, ChannelMap::Identity) => Some(Role::Depthwise),
            (Op::Conv2d { .. } | Op::Linear { .. }, _) => Some(Role::Filter),
            (Op::BatchNorm { .. }, _) => Some(Role::Norm),
            _ => None,
        };
        if let Some(role) = role {
            members.insert(Member {
                node,
                channel,
                role,
            });
        }
        for &reader in &consumers[node] {
            if matches!(maps[reader], ChannelMap::Grouped { .. }) {
                members.insert(Member {
                    node: reader,
                    channel,
                    role: Role::Column,
                });
            }
        }
    }
    members.into_iter().collect()
}

/// How many classes a unit takes from each atom: (atom, count) pairs.
type Take = Vec<(usize, usize)>;

/// Interchangeable classes: the same blocks of the same balance constraints.
struct Atom {
    /// (constraint, block) per slot in a constrained node, sorted.
    hits: Vec<(usize, usize)>,
    /// Its classes, in graph order.
    classes: Vec<usize>,
}

/// The greedy search that merges classes until every grouped-conv constraint is balanced.
struct Balance<'a> {
    /// Number of blocks of each constraint (constraints are in graph order).
    groups_of: &'a [usize],
    atoms: &'a [Atom],
    /// Per constraint and block: the atoms with a slot there.
    block_atoms: &'a [Vec<Vec<usize>>],
}

/// Removal counts of a unit under construction, per constraint.
struct Tally {
    counts: Vec<Vec<usize>>,
    max: Vec<usize>,
    sum: Vec<usize>,
}

impl Tally {
    fn deficit(&self, cid: usize) -> usize {
        self.counts[cid].len() * self.max[cid] - self.sum[cid]
    }

    /// Change of each constraint's deficit if `hits` (sorted by constraint) were added, as
    /// (constraint, change) in constraint order, zero changes left out.
    fn delta(&self, hits: &[(usize, usize)]) -> Vec<(usize, isize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < hits.len() {
            let cid = hits[i].0;
            let mut j = i;
            let mut new_max = self.max[cid];
            while j < hits.len() && hits[j].0 == cid {
                let b = hits[j].1;
                let same = hits[i..j].iter().filter(|h| h.1 == b).count();
                new_max = new_max.max(self.counts[cid][b] + same + 1);
                j += 1;
            }
            let new_sum = self.sum[cid] + (j - i);
            let d =
                (self.counts[cid].len() * new_max - new_sum) as isize - self.deficit(cid) as isize;
            if d != 0 {
                out.push((cid, d));
            }
            i = j;
        }
        out
    }

    fn add(&mut self, hits: &[(usize, usize)]) {
        for &(cid, b) in hits {
            self.counts[cid][b] += 1;
            self.sum[cid] += 1;
            self.max[cid] = self.max[cid].max(self.counts[cid][b]);
        }
    }
}

/// Orders sparse deficit changes by their effect on the earliest constraint they change:
/// upstream balance matters first.
fn lexicographic(a: &[(usize, isize)], b: &[(usize, isize)]) -> std::cmp::Ordering {
    let (mut i, mut j) = (0, 0);
    loop {
        let x = a.get(i).copied();
        let y = b.get(j).copied();
        let (ca, da) = x.unwrap_or((usize::MAX, 0));
        let (cb, db) = y.unwrap_or((usize::MAX, 0));
        if x.is_none() && y.is_none() {
            return std::cmp::Ordering::Equal;
        }
        let ord = match ca.cmp(&cb) {
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
                da.cmp(&db)
            }
            std::cmp::Ordering::Less => {
                i += 1;
                da.cmp(&0)
            }
            std::cmp::Ordering::Greater => {
                j += 1;
                0.cmp(&db)
            }
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
}

impl Balance<'_> {
    /// The smallest balanced set containing atom `seed`, from a linear program over atom
    /// counts (the balance constraints are a homogeneous linear system, so a rational
    /// solution scales to an integer one), verified exactly. At most `free[a]` classes of
    /// atom `a`; `None` when there is none within [`MAX_CLASSES_PER_UNIT`] classes.
    fn exact(&self, seed: usize, free: &[usize]) -> Option<Take> {
        let cap = MAX_CLASSES_PER_UNIT;
        // The atoms and constraints connected to the seed.
        let mut local: Vec<usize> = vec![seed];
        let mut index: HashMap<usize, usize> = HashMap::from([(seed, 0)]);
        let mut cids: BTreeSet<usize> = BTreeSet::new();
        let mut i = 0;
        while i < local.len() {
            for &(cid, _) in &self.atoms[local[i]].hits {
                if cids.insert(cid) {
                    for atoms in &self.block_atoms[cid] {
                        for &a in atoms {
                            if free[a] > 0 && !index.contains_key(&a) {
                                index.insert(a, local.len());
                                local.push(a);
                            }
                        }
                    }
                }
            }
            i += 1;
        }
        let k = local.len();
        // Variables: k atom counts, a surplus for `count(seed) >= 1`, k bound slacks.
        let n = 2 * k + 1;
        let mut rows: Vec<Vec<f64>> = Vec::new();
        let mut rhs: Vec<f64> = Vec::new();
        for &cid in &cids {
            let g = self.groups_of[cid];
            let mut per_block = vec![vec![0.0; n]; g];
            for (j, &a) in local.iter().enumerate() {
                for &(c, b) in &self.atoms[a].hits {
                    if c == cid {
                        per_block[b][j] += 1.0;
                    }
                }
            }
            for b in 1..g {
                let row: Vec<f64> = (0..n).map(|j| per_block[b][j] - per_block[0][j]).collect();
                if row.iter().any(|v| *v != 0.0) {
                    rows.push(row);
                    rhs.push(0.0);
                }
            }
        }
        let mut seed_row = vec![0.0; n];
        seed_row[0] = 1.0;
        seed_row[k] = -1.0;
        rows.push(seed_row);
        rhs.push(1.0);
        for (j, &a) in local.iter().enumerate() {
            let mut row = vec![0.0; n];
            row[j] = 1.0;
            row[k + 1 + j] = 1.0;
            rows.push(row);
            rhs.push(free[a] as f64);
        }
        let mut cost = vec![0.0; n];
        cost[..k].iter_mut().for_each(|c| *c = 1.0);
        let x = lp::minimise(&rows, &rhs, &cost)?;
        // Smallest integer multiple.
        let scale = (1..=cap).find(|&l| {
            x[..k]
                .iter()
                .all(|&v| (v * l as f64 - (v * l as f64).round()).abs() < 1e-6)
        })?;
        let counts: Vec<usize> = x[..k]
            .iter()
            .map(|&v| (v * scale as f64).round() as usize)
            .collect();
        let total: usize = counts.iter().sum();
        if total == 0 || total > cap || counts[0] == 0 {
            return None;
        }
        if local.iter().zip(&counts).any(|(&a, &c)| c > free[a]) {
            return None;
        }
        // Exact check.
        let mut tally = Tally {
            counts: self.groups_of.iter().map(|&g| vec![0; g]).collect(),
            max: vec![0; self.groups_of.len()],
            sum: vec![0; self.groups_of.len()],
        };
        for (&a, &c) in local.iter().zip(&counts) {
            for _ in 0..c {
                tally.add(&self.atoms[a].hits);
            }
        }
        if cids.iter().any(|&cid| tally.deficit(cid) != 0) {
            return None;
        }
        Some(
            local
                .into_iter()
                .zip(counts)
                .filter(|&(_, c)| c > 0)
                .collect(),
        )
    }

    /// Grows a balanced set from one class of atom `seed`, taking at most `free[a]` classes
    /// of atom `a` and at most `cap` classes in all. Constraints are balanced in graph order
    /// (the earliest unbalanced one first), each time with the atom whose effect on the
    /// constraints, read in graph order, is best: upstream balance comes first, and what is
    /// left unbalanced downstream is fixed later by channels born there. Returns (atom,
    /// count) pairs.
    fn grow(&self, seed: usize, cap: usize, free: &[usize]) -> Option<Take> {
        let mut tally = Tally {
            counts: self.groups_of.iter().map(|&g| vec![0; g]).collect(),
            max: vec![0; self.groups_of.len()],
            sum: vec![0; self.groups_of.len()],
        };
        let mut take: BTreeMap<usize, usize> = BTreeMap::new();
        let mut touched: BTreeSet<usize> = BTreeSet::new();
        let mut size = 0;
        let add = |a: usize,
                   tally: &mut Tally,
                   touched: &mut BTreeSet<usize>,
                   take: &mut BTreeMap<usize, usize>| {
            tally.add(&self.atoms[a].hits);
            touched.extend(self.atoms[a].hits.iter().map(|h| h.0));
            *take.entry(a).or_insert(0) += 1;
        };
        add(seed, &mut tally, &mut touched, &mut take);
        size += 1;
        while let Some(&cid) = touched.iter().find(|&&c| tally.deficit(c) > 0) {
            if size >= cap {
                return None;
            }
            let max = tally.max[cid];
            // The deficient block with the fewest atoms left to fill it goes first (a forced
            // choice made late is a conflict), then the atom with the best effect.
            let available = |a: usize| take.get(&a).copied().unwrap_or(0) < free[a];
            let mut block: Option<(usize, usize)> = None;
            for (b, atoms) in self.block_atoms[cid].iter().enumerate() {
                if tally.counts[cid][b] >= max {
                    continue;
                }
                let options = atoms.iter().filter(|&&a| available(a)).count();
                if block.is_none_or(|(n, _)| options < n) {
                    block = Some((options, b));
                }
            }
            let (_, b) = block?;
            let mut best: Option<(Vec<(usize, isize)>, usize)> = None;
            for &a in self.block_atoms[cid][b].iter().filter(|&&a| available(a)) {
                let key = tally.delta(&self.atoms[a].hits);
                let better = best.as_ref().is_none_or(|(k, other)| {
                    lexicographic(&key, k)
                        .then_with(|| self.atoms[a].classes[0].cmp(&self.atoms[*other].classes[0]))
                        == std::cmp::Ordering::Less
                });
                if better {
                    best = Some((key, a));
                }
            }
            let (_, a) = best?;
            add(a, &mut tally, &mut touched, &mut take);
            size += 1;
        }
        Some(take.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Activation, GraphBuilder};

    fn unit_with(units: &[PruneUnit], node: NodeId, channel: usize) -> &PruneUnit {
        units
            .iter()
            .find(|u| u.slots.contains(&(node, channel)))
            .unwrap_or_else(|| panic!("no unit removes channel {channel} of node {node}"))
    }

    fn filters_of(unit: &PruneUnit, node: NodeId) -> Vec<usize> {
        unit.members
            .iter()
            .filter(|m| m.node == node && m.role == Role::Filter)
            .map(|m| m.channel)
            .collect()
    }

    fn columns_of(unit: &PruneUnit, node: NodeId) -> Vec<usize> {
        unit.members
            .iter()
            .filter(|m| m.node == node && m.role == Role::Column)
            .map(|m| m.channel)
            .collect()
    }

    /// The head every tiny graph ends with: global pool, flatten, linear classifier.
    fn head(b: &mut GraphBuilder, x: NodeId) -> NodeId {
        let x = b.global_avg_pool(x);
        let x = b.flatten(x);
        b.linear("fc", x, 2, true)
    }

    #[test]
    fn union_find_joins_transitively() {
        let mut uf = UnionFind::new(5);
        uf.union(0, 1);
        uf.union(3, 4);
        uf.union(1, 4);
        assert_eq!(uf.find(0), uf.find(3));
        assert_ne!(uf.find(0), uf.find(2));
    }

    #[test]
    fn concat_ranges_belong_to_their_producers() {
        let mut b = GraphBuilder::new(3);
        let a = b.conv("a", GraphBuilder::INPUT, 4, 3, 1, 1, 1, false);
        let a = b.batch_norm("a_bn", a, 1e-5, 0.1);
        let a = b.act(Activation::Relu, a);
        let c = b.conv("c", GraphBuilder::INPUT, 5, 1, 1, 0, 1, true);
        let cat = b.concat(vec![a, c]);
        let d = b.conv("d", cat, 6, 1, 1, 0, 1, false);
        let out = head(&mut b, d);
        let g = b.finish(out);
        let groups = analyze(&g).unwrap();
        // 4 + 5 + 6 removable channels; the input and the logits are blocked.
        assert_eq!(groups.units.len(), 15);
        assert_eq!(groups.blocked.input, 3);
        assert_eq!(groups.blocked.output, 2);
        let (a_id, c_id, d_id) = (1, 4, 6);
        let u = unit_with(&groups.units, c_id, 2);
        assert_eq!(filters_of(u, c_id), vec![2]);
        assert_eq!(columns_of(u, d_id), vec![4 + 2]);
        assert_eq!(u.slots, vec![(c_id, 2), (cat, 6)]);
        let u = unit_with(&groups.units, a_id, 1);
        assert_eq!(columns_of(u, d_id), vec![1]);
        assert!(u.members.contains(&Member {
            node: 2,
            channel: 1,
            role: Role::Norm
        }));
        let u = unit_with(&groups.units, d_id, 5);
        assert_eq!(columns_of(u, g.node_by_name("fc").unwrap()), vec![5]);
    }

    #[test]
    fn split_and_shuffle_pair_the_pass_through_half_with_the_branch() {
        // A ShuffleNet V2 unit: split in halves, convolve one, concat, shuffle in 2.
        let mut b = GraphBuilder::new(3);
        let x = b.conv("stem", GraphBuilder::INPUT, 8, 3, 1, 1, 1, false);
        let left = b.slice(x, 0, 4);
        let right = b.slice(x, 4, 8);
        let y = b.conv("branch", right, 4, 1, 1, 0, 1, false);
        let y = b.batch_norm("branch_bn", y, 1e-5, 0.1);
        let cat = b.concat(vec![left, y]);
        let shuffled = b.shuffle(cat, 2);
        let z = b.conv("next", shuffled, 3, 1, 1, 0, 1, false);
        let out = head(&mut b, z);
        let g = b.finish(out);
        let groups = analyze(&g).unwrap();
        let (stem, branch, next) = (1, 4, g.node_by_name("next").unwrap());
        // Pass-through channel j pairs with branch output j; they land at 2j and 2j + 1.
        for j in 0..4 {
            let u = unit_with(&groups.units, stem, j);
            assert_eq!(filters_of(u, stem), vec![j]);
            assert_eq!(filters_of(u, branch), vec![j]);
            assert_eq!(columns_of(u, next), vec![2 * j, 2 * j + 1]);
            assert_eq!(u.removed_from(shuffled), 2);
        }
        // The split-off half only feeds the branch conv.
        let u = unit_with(&groups.units, stem, 6);
        assert_eq!(filters_of(u, stem), vec![6]);
        assert_eq!(columns_of(u, branch), vec![2]);
        assert!(filters_of(u, branch).is_empty());
        // 4 pairs + 4 split-off + 3 `next` channels.
        assert_eq!(groups.units.len(), 11);
    }

    #[test]
    fn grouped_conv_removes_the_same_count_from_every_group() {
        let mut b = GraphBuilder::new(3);
        let x = b.conv("a", GraphBuilder::INPUT, 6, 3, 1, 1, 1, false);
        let y = b.conv("g", x, 9, 1, 1, 0, 3, false);
        let out = head(&mut b, y);
        let g = b.finish(out);
        let groups = analyze(&g).unwrap();
        for u in &groups.units {
            let a: Vec<usize> = filters_of(u, 1);
            if !a.is_empty() {
                // One input channel of each group of 2.
                let mut per_group = [0; 3];
                a.iter().for_each(|&c| per_group[c / 2] += 1);
                assert_eq!(per_group, [1, 1, 1], "{a:?}");
                assert_eq!(columns_of(u, 2), a);
            }
            let gf = filters_of(u, 2);
            if !gf.is_empty() {
                let mut per_group = [0; 3];
                gf.iter().for_each(|&c| per_group[c / 3] += 1);
                assert_eq!(per_group, [1, 1, 1], "{gf:?}");
            }
        }
        // 2 units for a's 6 channels, 3 for g's 9.
        assert_eq!(groups.units.len(), 5);
    }

    #[test]
    fn residual_add_ties_both_producers() {
        let mut b = GraphBuilder::new(3);
        let x = b.conv("a", GraphBuilder::INPUT, 4, 3, 1, 1, 1, false);
        let x = b.batch_norm("a_bn", x, 1e-5, 0.1);
        let y = b.conv("b", x, 4, 3, 1, 1, 1, false);
        let y = b.batch_norm("b_bn", y, 1e-5, 0.1);
        let s = b.add(x, y);
        let s = b.act(Activation::Relu, s);
        let z = b.conv("c", s, 5, 1, 1, 0, 1, false);
        let out = head(&mut b, z);
        let g = b.finish(out);
        let groups = analyze(&g).unwrap();
        let u = unit_with(&groups.units, 1, 3);
        assert_eq!(filters_of(u, 1), vec![3]);
        assert_eq!(filters_of(u, 3), vec![3]);
        assert_eq!(columns_of(u, 3), vec![3]);
        assert_eq!(columns_of(u, 7), vec![3]);
        assert_eq!(groups.units.len(), 4 + 5);
    }

    #[test]
    fn shuffle_between_grouped_convs_balances_uneven_rows() {
        // ShuffleNet V1's bottleneck: 6 channels in 2 groups (3 per group, not divisible by 2).
        let mut b = GraphBuilder::new(4);
        let x = b.conv("m1", GraphBuilder::INPUT, 6, 1, 1, 0, 2, false);
        let x = b.conv("dw", x, 6, 3, 1, 1, 6, false);
        let x = b.shuffle(x, 2);
        let y = b.conv("m2", x, 4, 1, 1, 0, 2, false);
        let out = head(&mut b, y);
        let g = b.finish(out);
        let groups = analyze(&g).unwrap();
        let mid: Vec<Vec<usize>> = groups
            .units
            .iter()
            .map(|u| filters_of(u, 1))
            .filter(|f| !f.is_empty())
            .collect();
        // Position 1 of both rows alone is balanced for m2; positions 0 and 2 go together.
        assert_eq!(mid, vec![vec![0, 2, 3, 5], vec![1, 4]]);
    }

    #[test]
    fn flatten_without_global_pool_blocks() {
        let mut b = GraphBuilder::new(3);
        let x = b.conv("a", GraphBuilder::INPUT, 4, 3, 1, 1, 1, false);
        let x = b.flatten(x);
        let x = b.linear("fc", x, 2, true);
        let g = b.finish(x);
        let groups = analyze(&g).unwrap();
        assert!(groups.units.is_empty());
        assert_eq!(groups.blocked.flatten, 4);
    }
}
