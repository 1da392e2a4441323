//! `bind` and `unbind`: the driver changes the CLI makes through sysfs,
//! refused while the daemon owns the device or a process holds it (its
//! /dev/uioN, VFIO group or device fd) unless `--force`, and bounded in
//! time (the kernel's unbind of a device in use waits for its user).

use super::*;

/// Refuses to touch the binding of a device the daemon owns (whatever
/// `--force` says: the daemon would lose a device in service).
pub(super) fn refuse_if_owned(bdf: Bdf, common: &Common) -> Result<(), Failure> {
    if let Some(mut client) = reach(common)? {
        let data = ask(&mut client, &Request::Status)?;
        let owned = data["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["bdf"] == bdf.to_string()));
        if owned {
            let pid = data["pid"].as_u64().unwrap_or_default();
            return Err(Failure::new(
                exit::BUSY,
                "busy",
                format!("{bdf}: the vfio-intx daemon (PID {pid}) owns this device; remove it from the daemon's configuration and reload first"),
            ));
        }
    }
    Ok(())
}

/// Refuses to change the binding of a device a process holds open, unless
/// `force`: unbinding takes a uio device from its user (who then gets EIO)
/// and blocks in the kernel until a VFIO user lets go.
pub(super) fn refuse_if_held(bdf: Bdf, command: &str, change: &Change) -> Result<(), Failure> {
    let scan = Holders::default().of(bdf).map_err(|e| {
        // The code of the sysfs cause (no such device: 5), else 3.
        let code = match &e {
            HoldersError::Sysfs { source, .. } => exit_code(source),
            _ => exit::RUNTIME,
        };
        Failure::new(code, kind_name(code), crate::error_chain(&e))
    })?;
    if scan.unreadable > 0 {
        tracing::warn!(
            %bdf,
            processes = scan.unreadable,
            "could not read every process's descriptors; holders may be missed"
        );
    }
    if !scan.is_held() {
        return Ok(());
    }
    if change.force {
        eprintln!(
            "{command} {bdf}: in use ({}); going ahead because of --force",
            scan.describe()
        );
        return Ok(());
    }
    Err(Failure::new(
        exit::BUSY,
        "busy",
        format!(
            "{bdf}: in use: {}; stop it (or pass --force to take the device from it)",
            scan.describe()
        ),
    ))
}

/// Runs a binding change on a helper thread and waits at most
/// `change.wait` seconds for it: vfio-pci's unbind blocks in the kernel
/// until the device's user releases it. After a second it says who it is
/// waiting for (on stderr, as `OP BDF: still waiting for ...`); at the deadline it gives up with exit 8. The kernel write
/// itself cannot be cancelled: it stays pending, and this process cannot
/// finish exiting, until the holder lets go.
pub(super) fn bounded<T: Send + 'static>(
    bdf: Bdf,
    command: &str,
    change: &Change,
    op: impl FnOnce() -> Result<T, SysfsError> + Send + 'static,
) -> Result<T, Failure> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("sysfs-write".into())
        .spawn(move || {
            // The receiver may be gone after the deadline.
            let _ = tx.send(op());
        })
        .map_err(|e| {
            Failure::new(
                exit::RUNTIME,
                "runtime",
                format!("{bdf}: starting the sysfs writer thread: {e}"),
            )
        })?;
    let start = Instant::now();
    let deadline = Duration::from_secs(change.wait);
    let mut said = false;
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        let wait = if said {
            left
        } else {
            left.min(Duration::from_secs(1))
        };
        match rx.recv_timeout(wait) {
            Ok(result) => return result.map_err(|e| Failure::from_error(&e)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Failure::new(
                    exit::FAILED,
                    "failed",
                    format!("{bdf}: the sysfs writer thread ended without an answer"),
                ))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let who = who_holds(bdf);
                if start.elapsed() >= deadline {
                    return Err(Failure::new(
                        exit::BUSY,
                        "busy",
                        format!(
                            "{bdf}: gave up after {} s waiting for {who} to release the device; \
                             the kernel's unbind cannot be cancelled: it completes (and this \
                             command exits) only when the device is released",
                            change.wait
                        ),
                    ));
                }
                if !said {
                    eprintln!("{command} {bdf}: still waiting for {who} to release the device");
                    said = true;
                }
            }
        }
    }
}

/// "PID 12 (qemu)" for the device's holders, for the waiting messages.
pub(super) fn who_holds(bdf: Bdf) -> String {
    match Holders::default().of(bdf) {
        Ok(scan) if scan.is_held() => {
            let mut seen = Vec::new();
            for h in &scan.holders {
                let who = format!("PID {} ({})", h.pid, h.comm);
                if !seen.contains(&who) {
                    seen.push(who);
                }
            }
            seen.join(", ")
        }
        _ => "the device's user".to_owned(),
    }
}

pub(super) fn bind(
    text: &str,
    driver: &str,
    change: &Change,
    common: &Common,
) -> Result<Output, Failure> {
    let bdf = parse_bdf(text)?;
    refuse_if_owned(bdf, common)?;
    let sysfs = PciSysfs::default();
    // Already bound to it: nothing changes, nobody is disturbed.
    if sysfs
        .driver(bdf)
        .map_err(|e| Failure::from_error(&e))?
        .as_deref()
        != Some(driver)
    {
        refuse_if_held(bdf, "bind", change)?;
    }
    let to = driver.to_owned();
    let binding = bounded(bdf, "bind", change, move || sysfs.bind(bdf, &to))?;
    Ok(Output {
        json: json!({
            "bdf": bdf.to_string(),
            "driver": driver,
            "previous": binding.previous(),
            "changed": binding.changed(),
        }),
        text: if binding.changed() {
            format!(
                "{bdf}: bound to {driver} (was {})",
                binding.previous().unwrap_or("unbound")
            )
        } else {
            format!("{bdf}: already bound to {driver}")
        },
    })
}

pub(super) fn unbind(text: &str, change: &Change, common: &Common) -> Result<Output, Failure> {
    let bdf = parse_bdf(text)?;
    refuse_if_owned(bdf, common)?;
    refuse_if_held(bdf, "unbind", change)?;
    let previous = bounded(bdf, "unbind", change, move || {
        PciSysfs::default().unbind_device(bdf)
    })?;
    Ok(Output {
        json: json!({ "bdf": bdf.to_string(), "previous": previous }),
        text: format!(
            "{bdf}: unbound (was {})",
            previous.as_deref().unwrap_or("unbound")
        ),
    })
}
