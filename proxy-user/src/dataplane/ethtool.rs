//! The two ethtool requests kpr makes of an interface (SIOCETHTOOL, in the
//! calling thread's network namespace): which driver runs it, which decides
//! whether XDP pays there, and turning TX checksum offload off, which the
//! test bed needs on veths whose frames XDP rewrites.
use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ifreq` with its union as the pointer SIOCETHTOOL takes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// `struct ethtool_value`.
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DriverInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Sends one ethtool request about `iface`; `data` is the request's
/// structure, its command word first.
fn request<T>(iface: &str, data: &mut T) -> io::Result<()> {
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{iface:?}: not an interface name"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: data as *mut T as *mut libc::c_void,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `req` and the structure it points to outlive the call.
    let done = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    let error = io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if done != 0 {
        return Err(error);
    }
    Ok(())
}

/// The name of the driver behind `iface` ("veth", "mlx5_core", ...).
pub fn driver(iface: &str) -> io::Result<String> {
    // SAFETY: plain integers and byte arrays: all zeroes is valid.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    request(iface, &mut info)?;
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Makes `iface` put full L4 checksums in the frames it sends instead of
/// leaving them to a NIC (`ethtool -K IFACE tx off`).
pub fn send_full_checksums(iface: &str) -> io::Result<()> {
    let mut value = Value {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    request(iface, &mut value)
}
