//! Real TUN devices (needs root and /dev/net/tun; skipped otherwise). Each
//! test runs on its own thread inside a fresh network namespace, so nothing
//! touches the host's interfaces, and the namespace disappears with the
//! thread's last device.

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use wiremesh_dataplane::tun::{interface_index, split, Offloads, Options, Tun, TunError, VirtioNetHdr};

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: needs root and /dev/net/tun");
        return false;
    }
    true
}

/// Runs `f` on a new thread in a new network namespace.
fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        f();
    })
    .join()
    .unwrap();
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}");
}

#[test]
fn create_probe_configure_and_remove() {
    if !usable() {
        return;
    }
    in_new_netns(|| {
        let name = format!("wmtun{}", std::process::id() % 1_000_000);
        let options = Options { multi_queue: true, nonblocking: true, ..Options::with_offloads() };
        let tun = Tun::create(&name, &options).expect("create TUN");
        assert_eq!(tun.name(), name);
        assert!(tun.vnet_hdr());
        let offloads = tun.offloads();
        eprintln!("kernel accepted TUN offloads: {offloads}");
        // Checksum and TCP segmentation offload exist since Linux 2.6.27,
        // UDP segmentation offload since 6.2.
        assert!(offloads.contains(Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6), "{offloads}");

        // Non-blocking: nothing to read while the device is down (once up,
        // IPv6 router solicitations may arrive).
        let mut buf = [0u8; 2048];
        assert_eq!(tun.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);

        tun.set_mtu(1420).unwrap();
        assert_eq!(tun.mtu().unwrap(), 1420);
        tun.set_up(true).unwrap();
        let index = tun.index().unwrap();
        assert!(index > 0);
        assert_eq!(interface_index(&name).unwrap(), index);

        // A second queue of the multi-queue device.
        let queue = tun.open_queue().unwrap();
        assert_eq!(queue.name(), name);
        assert_eq!(queue.offloads(), offloads);
        assert_ne!(queue.as_raw_fd(), tun.as_raw_fd());
        drop(queue);

        // A single-queue device cannot be opened twice; other kinds of
        // device hold their names too.
        let single = format!("wmone{}", std::process::id() % 1_000_000);
        let first = Tun::create(&single, &Options::default()).unwrap();
        assert!(first.offloads() == Offloads::NONE && !first.vnet_hdr());
        let err = Tun::create(&single, &Options::default()).unwrap_err();
        assert!(matches!(&err, TunError::Exists(n) if *n == single), "{err}");
        assert_eq!(err.to_string(), format!("interface {single} already exists"));
        let err = Tun::create("lo", &Options::default()).unwrap_err();
        assert!(matches!(err, TunError::Exists(_)), "{err}");
        drop(first);

        // The kernel picks a name from a pattern.
        let picked = Tun::create("wmauto%d", &Options::default()).unwrap();
        assert!(picked.name().starts_with("wmauto"), "{}", picked.name());
        assert!(!picked.name().contains('%'));

        // Closing the last queue removes the device.
        drop(tun);
        assert!(interface_index(&name).is_err(), "device still there");
        assert!(interface_index(&single).is_err(), "device still there");
    });
}

/// The naive one's complement sum, independent of the crate's.
fn sum(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for (i, &b) in data.iter().enumerate() {
        s += if i % 2 == 0 { u32::from(b) << 8 } else { u32::from(b) };
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

fn ipv4_l4_checksum_ok(packet: &[u8], protocol: u8) -> bool {
    let ihl = usize::from(packet[0] & 0xf) * 4;
    let l4 = &packet[ihl..];
    let mut pseudo = packet[12..20].to_vec();
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    sum(&pseudo) == 0xffff
}

fn checksum(data: &[u8]) -> u16 {
    !(sum(data) as u16)
}

/// Reads packets until `want` accepts one, answering nothing; panics after 5 s.
fn read_until(tun: &Tun, want: &mut dyn FnMut(VirtioNetHdr, &[u8]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536 + VirtioNetHdr::LEN];
    while Instant::now() < deadline {
        match tun.recv(&mut buf) {
            Ok(n) => {
                let hdr = VirtioNetHdr::parse(&buf[..n]).unwrap();
                if want(hdr, &buf[VirtioNetHdr::LEN..n]) {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    panic!("timed out waiting for a packet");
}

/// Splits a packet from TUN and checks every resulting IPv4 packet.
fn split_checked(hdr: &VirtioNetHdr, packet: &[u8], protocol: u8, mtu: usize) -> Vec<Vec<u8>> {
    let mut out = vec![vec![0u8; 16 + 1500]; 64];
    let mut sizes = vec![0; 64];
    let n = split(hdr, packet, 16, &mut out, &mut sizes).unwrap();
    out.iter()
        .zip(&sizes)
        .take(n)
        .map(|(buf, &size)| {
            let p = buf[16..16 + size].to_vec();
            assert!(p.len() <= mtu, "segment of {} bytes", p.len());
            assert_eq!(sum(&p[..20]), 0xffff, "IPv4 header checksum");
            assert!(ipv4_l4_checksum_ok(&p, protocol), "L4 checksum");
            p
        })
        .collect()
}

/// The kernel's TCP stack sends through our TUN device with offloads on; we
/// play the remote end of a handshake, then take its first flight of data:
/// a TSO super-packet we split into valid wire packets. A UDP_SEGMENT send
/// arrives as a USO super-packet if the kernel took USO.
#[test]
fn kernel_super_packets_split_into_valid_packets() {
    if !usable() {
        return;
    }
    in_new_netns(|| {
        const MTU: usize = 1500;
        let options = Options { nonblocking: true, ..Options::with_offloads() };
        let tun = Tun::create("wmtso0", &options).unwrap();
        tun.set_mtu(MTU as u32).unwrap();
        ip(&["addr", "add", "10.77.0.1/24", "dev", "wmtso0"]);
        tun.set_up(true).unwrap();

        let client = std::thread::spawn(|| {
            let stream = TcpStream::connect_timeout(&"10.77.0.2:443".parse().unwrap(), Duration::from_secs(5))
                .expect("connect through TUN");
            let writer = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = (&writer).write_all(&vec![0x5a; 200_000]);
            });
            stream
        });

        // The SYN, with a partial checksum we complete.
        let mut client_port = 0;
        let mut client_isn = 0;
        read_until(&tun, &mut |hdr, packet| {
            if packet[0] >> 4 != 4 || packet[9] != 6 || packet[33] & 0x02 == 0 {
                return false;
            }
            let p = split_checked(&hdr, packet, 6, MTU).remove(0);
            client_port = u16::from_be_bytes([p[20], p[21]]);
            client_isn = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            true
        });

        // Our SYN-ACK, MSS 1400, written with a plain virtio-net header.
        let server_isn: u32 = 1_000_000;
        let mut reply = vec![0u8; VirtioNetHdr::LEN];
        let mut ip_header = vec![0x45, 0, 0, 44, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1];
        let c = checksum(&ip_header);
        ip_header[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&443u16.to_be_bytes());
        tcp.extend_from_slice(&client_port.to_be_bytes());
        tcp.extend_from_slice(&server_isn.to_be_bytes());
        tcp.extend_from_slice(&client_isn.wrapping_add(1).to_be_bytes());
        tcp.extend_from_slice(&[6 << 4, 0x12, 0xff, 0xff, 0, 0, 0, 0, 2, 4]);
        tcp.extend_from_slice(&1400u16.to_be_bytes());
        let mut pseudo = ip_header[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 24]);
        pseudo.extend_from_slice(&tcp);
        let c = checksum(&pseudo);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        reply.extend_from_slice(&ip_header);
        reply.extend_from_slice(&tcp);
        assert_eq!(tun.send(&reply).unwrap(), reply.len());
        let stream = client.join().unwrap();

        // The first flight: at least one TSO super-packet.
        let mut next_seq = client_isn.wrapping_add(1);
        let mut super_packets = 0;
        read_until(&tun, &mut |hdr, packet| {
            if packet[0] >> 4 != 4 || packet[9] != 6 || packet.len() <= 40 {
                return false;
            }
            let segments = split_checked(&hdr, packet, 6, MTU);
            if hdr.is_gso() {
                assert_eq!(hdr.gso_type & !VirtioNetHdr::GSO_ECN, VirtioNetHdr::GSO_TCPV4);
                assert!(segments.len() > 1);
                super_packets += 1;
            }
            for p in &segments {
                let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
                let data = p.len() - 20 - usize::from(p[32] >> 4) * 4;
                if data > 0 {
                    assert_eq!(seq, next_seq, "segments continue the byte stream");
                    assert!(data <= 1400, "{data} bytes exceeds the MSS");
                    next_seq = seq.wrapping_add(data as u32);
                }
            }
            super_packets > 0
        });
        eprintln!("TSO: {} bytes of the first flight checked", next_seq.wrapping_sub(client_isn.wrapping_add(1)));
        stream.shutdown(Shutdown::Both).unwrap();

        // UDP: one send of 3000 bytes in 1200-byte datagrams.
        let udp = UdpSocket::bind("10.77.0.1:0").unwrap();
        let size: libc::c_int = 1200;
        // SAFETY: UDP_SEGMENT reads one c_int from the pointer, valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        udp.send_to(&[7u8; 3000], "10.77.0.2:9999").unwrap();
        let uso = tun.offloads().contains(Offloads::USO4);
        let mut datagrams = 0;
        read_until(&tun, &mut |hdr, packet| {
            if packet[0] >> 4 != 4 || packet[9] != 17 {
                return false;
            }
            assert_eq!(hdr.is_gso(), uso, "USO super-packet iff USO was accepted");
            for p in split_checked(&hdr, packet, 17, MTU) {
                assert_eq!(usize::from(u16::from_be_bytes([p[24], p[25]])), p.len() - 20);
                datagrams += 1;
            }
            datagrams == 3
        });
    });
}
