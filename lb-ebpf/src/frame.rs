//! Access to the packet: bounds-checked pointers into an XDP buffer or the linear part of
//! an skb, and loads and stores at offsets that work in both.

use aya_ebpf::programs::{TcContext, XdpContext};

/// A packet the programs read and write in place: an XDP buffer, or the linear part of an skb.
pub(crate) trait Frame {
    /// Address of the first byte.
    fn start(&self) -> usize;
    /// Address one past the last byte the program can address directly.
    fn end(&self) -> usize;
    /// Bytes in the packet (an skb's may be more than its linear part).
    fn len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// A pointer to a `T` at `offset` in the packet, if the packet holds all of it.
#[inline(always)]
pub(crate) fn ptr_at<C: Frame, T>(ctx: &C, offset: usize) -> Option<*mut T> {
    let start = ctx.start();
    if start + offset + core::mem::size_of::<T>() > ctx.end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Loads and stores at packet offsets: direct access in XDP, the skb helpers in TC, so that
/// a rewrite both use (the ICMP errors') is written once.
pub(crate) trait Bytes {
    fn get<T: Copy>(&self, offset: usize) -> Option<T>;
    fn set<T: Copy>(&self, offset: usize, value: T) -> Option<()>;
}

impl Bytes for XdpContext {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: usize) -> Option<T> {
        ptr_at::<_, T>(self, offset).map(|p| unsafe { p.read_unaligned() })
    }

    #[inline(always)]
    fn set<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        ptr_at::<_, T>(self, offset).map(|p| unsafe { p.write_unaligned(value) })
    }
}

impl Bytes for TcContext {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }

    #[inline(always)]
    fn set<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        self.store(offset, &value, 0).ok()
    }
}
