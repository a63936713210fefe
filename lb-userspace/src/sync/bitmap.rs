//! The destination pre-filter's bitmap (`lb_common::prefilter`): one bit per bucket of frontends, set before the first frontend
//! of its bucket and cleared after the last.

use super::*;

/// The pre-filter bitmap as the map holds it, and how many frontends each bucket counts.
#[derive(Debug, Default)]
pub(super) struct Prefilter {
    /// Bucket -> frontends counted in it (never 0).
    pub(super) users: HashMap<u32, u32>,
    /// The non-zero words of the bitmap, by index.
    pub(super) words: HashMap<u32, u64>,
}

impl Prefilter {
    /// The words that `users` calls for.
    pub(super) fn wanted_words(&self) -> HashMap<u32, u64> {
        let mut words: HashMap<u32, u64> = HashMap::new();
        for bucket in self.users.keys() {
            let (index, bit) = prefilter::position(*bucket);
            *words.entry(index).or_default() |= bit;
        }
        words
    }
}

impl<M: DatapathMaps> Syncer<M> {
    /// Counts `key` in its pre-filter bucket (`add`) or stops counting it: the bucket's bit
    /// is set before its first frontend is counted, and cleared after its last one goes.
    pub(super) fn prefilter_count(
        &mut self,
        key: &FrontendKey,
        add: bool,
    ) -> Result<(), MapOpError> {
        let bucket = key.prefilter_bucket();
        let users = self.prefilter.users.get(&bucket).copied().unwrap_or(0);
        let flips = if add { users == 0 } else { users == 1 };
        if flips {
            let (index, bit) = prefilter::position(bucket);
            let old = self.prefilter.words.get(&index).copied().unwrap_or(0);
            let word = if add { old | bit } else { old & !bit };
            self.op(|m| m.put_prefilter_word(index, word))?;
            if word == 0 {
                self.prefilter.words.remove(&index);
            } else {
                self.prefilter.words.insert(index, word);
            }
        }
        match (add, users) {
            (true, _) => {
                self.prefilter.users.insert(bucket, users + 1);
            }
            (false, 0 | 1) => {
                self.prefilter.users.remove(&bucket);
            }
            (false, _) => {
                self.prefilter.users.insert(bucket, users - 1);
            }
        }
        Ok(())
    }
}
