//! [`Items`]: the budget windows of one charge, as the journal's `Event::AddMany` carries
//! them (inline up to a few, on the heap beyond).

use crate::model::window::Window;

/// The budget windows of one charge (`Event::AddMany`): up to [`Items::INLINE`] budgets in
/// at most two distinct windows held in the event itself (the usual charge: provider, model,
/// deployment and a tag, whose periods give one or two windows), anything else on the heap.
///
/// Why inline: a boxed slice per charge was an allocation on the request path and a free on
/// the journal thread (glibc's arena lock shared by both). Why this shape: windows repeat
/// across a charge's budgets, and each event crosses between two cores through the channel's
/// ring, so it is kept small (an event is 80 bytes, a test of `journal` keeps it within 96:
/// the preallocated ring of 65 536 events takes ~5 MB).
#[derive(Debug)]
pub(crate) enum Items {
    Inline {
        len: u8,
        /// Bit `i`: budget `i` is in `windows[1]`, else in `windows[0]`.
        second: u8,
        budgets: [u32; Items::INLINE],
        windows: [Window; 2],
    },
    Heap(Vec<(u32, Window)>),
}

impl Default for Items {
    fn default() -> Items {
        Items::Inline {
            len: 0,
            second: 0,
            budgets: [0; Items::INLINE],
            windows: [Window::from_secs(0, 0); 2],
        }
    }
}

impl Items {
    /// Budgets held without an allocation.
    pub const INLINE: usize = 4;

    #[inline]
    pub fn push(&mut self, (budget, window): (u32, Window)) {
        match self {
            Items::Inline {
                len,
                second,
                budgets,
                windows,
            } => {
                let i = usize::from(*len);
                let slot = if i == 0 || windows[0] == window {
                    Some(0)
                } else if *second == 0 || windows[1] == window {
                    Some(1)
                } else {
                    None
                };
                match slot {
                    Some(w) if i < Items::INLINE => {
                        windows[w] = window;
                        budgets[i] = budget;
                        *second |= u8::from(w == 1) << i;
                        *len += 1;
                    }
                    _ => {
                        let mut heap: Vec<(u32, Window)> = Vec::with_capacity(2 * Items::INLINE);
                        heap.extend(self.iter());
                        heap.push((budget, window));
                        *self = Items::Heap(heap);
                    }
                }
            }
            Items::Heap(heap) => heap.push((budget, window)),
        }
    }

    /// The (budget, window) pairs in the order pushed.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = (u32, Window)> + '_ {
        let (inline, heap) = match self {
            Items::Inline {
                len,
                second,
                budgets,
                windows,
            } => {
                let pairs = budgets[..usize::from(*len)]
                    .iter()
                    .enumerate()
                    .map(move |(i, &b)| (b, windows[usize::from(second >> i & 1)]));
                (Some(pairs), None)
            }
            Items::Heap(heap) => (None, Some(heap.iter().copied())),
        };
        inline
            .into_iter()
            .flatten()
            .chain(heap.into_iter().flatten())
    }

    /// Whether it holds nothing.
    #[inline]
    pub fn is_empty(&self) -> bool {
        match self {
            Items::Inline { len, .. } => *len == 0,
            Items::Heap(heap) => heap.is_empty(),
        }
    }

    /// The only pair, when there is exactly one.
    #[inline]
    pub fn single(&self) -> Option<(u32, Window)> {
        let mut it = self.iter();
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_keep_their_order_inline_and_past_it() {
        let w = |i: i64| Window::from_secs(i, i + 1);
        // Inline while at most 4 budgets in at most 2 distinct windows.
        let cases: [(&[i64], bool); 6] = [
            (&[0], true),
            (&[0, 0, 0, 0], true),
            (&[0, 1, 0, 1], true),
            (&[5, 5, 6, 5], true),
            (&[0, 1, 2], false),
            (&[0, 0, 0, 0, 0], false),
        ];
        for (windows, inline) in cases {
            let all: Vec<(u32, Window)> = windows
                .iter()
                .enumerate()
                .map(|(i, &s)| (10 + i as u32, w(s)))
                .collect();
            let mut items = Items::default();
            assert_eq!(items.iter().count(), 0);
            for &item in &all {
                items.push(item);
            }
            assert_eq!(items.iter().collect::<Vec<_>>(), all, "{windows:?}");
            assert_eq!(matches!(items, Items::Inline { .. }), inline, "{windows:?}");
            assert_eq!(items.single(), (all.len() == 1).then(|| all[0]));
        }
    }
}
