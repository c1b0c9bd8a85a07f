//! A mailbox: a crossbeam channel plus a doorbell (`AtomicWaker`), for handing work to a
//! task that runs on another thread (a shard, or the cluster thread). Senders never block
//! or wake anyone per message: they `push`, and `ring` once per batch. The receiving task
//! drains in batches and sleeps while the box is empty.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// The sending side, shared by every sender (behind an `Arc`).
pub struct Mailbox<T> {
    tx: Sender<T>,
    doorbell: AtomicWaker,
    /// Senders are done: the receiver drains what is left and ends.
    closed: AtomicBool,
}

impl<T> Mailbox<T> {
    /// A mailbox and its one receiver.
    pub fn new() -> (Arc<Mailbox<T>>, Receiver<T>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mailbox = Arc::new(Mailbox {
            tx,
            doorbell: AtomicWaker::new(),
            closed: AtomicBool::new(false),
        });
        (mailbox, rx)
    }

    /// Queues `msg` without waking the receiver (ring once per batch).
    pub fn push(&self, msg: T) {
        // The receiver lives as long as its thread; a message after it ended is moot.
        let _ = self.tx.send(msg);
    }

    /// Wakes the receiver if it sleeps waiting for messages. Cheap when it is awake.
    pub fn ring(&self) {
        self.doorbell.wake();
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Tells the receiver to finish once it has drained what is queued.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.doorbell.wake();
    }

    /// Waits until at least one message is queued, then moves up to `max` into `batch`.
    /// Returns false once the mailbox is closed (or every sender is gone) and drained.
    pub async fn next_batch(&self, rx: &Receiver<T>, batch: &mut Vec<T>, max: usize) -> bool {
        poll_fn(|cx| {
            if drain(rx, batch, max) {
                return Poll::Ready(true);
            }
            self.doorbell.register(cx.waker());
            // Drained again after registering, so a message sent in between is not missed.
            if drain(rx, batch, max) {
                return Poll::Ready(true);
            }
            if self.closed.load(Ordering::Acquire) {
                return Poll::Ready(false);
            }
            match rx.try_recv() {
                Err(TryRecvError::Disconnected) => Poll::Ready(false),
                Ok(msg) => {
                    batch.push(msg);
                    Poll::Ready(true)
                }
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }
}

fn drain<T>(rx: &Receiver<T>, batch: &mut Vec<T>, max: usize) -> bool {
    let before = batch.len();
    batch.extend(rx.try_iter().take(max));
    batch.len() > before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_from_another_thread_wakes_the_receiver_and_close_ends_it() {
        let (mailbox, rx) = Mailbox::<u32>::new();
        let sender = mailbox.clone();
        let producer = std::thread::spawn(move || {
            for i in 0..1000 {
                sender.push(i);
                if i % 100 == 99 {
                    sender.ring();
                }
            }
            sender.close();
        });
        let mut got = Vec::new();
        futures_lite::future::block_on(async {
            let mut batch = Vec::new();
            while mailbox.next_batch(&rx, &mut batch, 64).await {
                assert!(batch.len() <= 64);
                got.append(&mut batch);
            }
        });
        producer.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>(), "every message, once, in order");
    }
}
