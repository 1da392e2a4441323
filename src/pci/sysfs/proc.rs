//! `/proc/interrupts` parsing: the handlers on an IRQ line and its count.

/// The handler names registered on `irq` in the text of `/proc/interrupts`
/// (empty when the IRQ is not listed or has no handler).
///
/// A line reads `IRQ: <count per CPU> <chip> <hwirq>-<flow> <name>, <name>...`,
/// e.g. ` 22:   123   IO-APIC  22-fasteoi   uio_pci_generic, ahci[0000:00:1f.2]`
/// (`show_interrupts` in kernel/irq/proc.c). Names may contain spaces
/// ("PCIe PME"), so they are split at ", " only.
pub fn interrupt_handlers(proc_interrupts: &str, irq: u32) -> Vec<String> {
    let mut lines = proc_interrupts.lines();
    let cpus = lines
        .next()
        .map_or(0, |header| header.split_whitespace().count());
    let label = format!("{irq}:");
    for line in lines {
        let rest = line.trim_start();
        let Some(rest) = rest.strip_prefix(&label) else {
            continue;
        };
        let mut rest = rest;
        // Skip the per-CPU counts.
        for _ in 0..cpus {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if !rest[..end].bytes().all(|b| b.is_ascii_digit()) {
                break;
            }
            rest = &rest[end..];
        }
        // The chip name, then the hwirq and flow ("22-fasteoi", "-edge" or
        // a bare number), then the handlers.
        let mut fields = rest.trim_start().splitn(2, char::is_whitespace);
        let _chip = fields.next();
        let mut rest = fields.next().unwrap_or("").trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let token = &rest[..end];
        let looks_like_hwirq = !token.is_empty()
            && token
                .split_once('-')
                .map_or(token.bytes().all(|b| b.is_ascii_digit()), |(n, _)| {
                    n.bytes().all(|b| b.is_ascii_digit())
                });
        if looks_like_hwirq {
            rest = &rest[end..];
        }
        return rest
            .trim()
            .split(", ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    Vec::new()
}

/// The interrupts taken on `irq` on every CPU, from the text of
/// `/proc/interrupts` (see [`interrupt_handlers`] for the format); `None`
/// when the IRQ is not listed.
pub fn interrupt_count(proc_interrupts: &str, irq: u32) -> Option<u64> {
    let mut lines = proc_interrupts.lines();
    let cpus = lines.next()?.split_whitespace().count();
    let label = format!("{irq}:");
    lines
        .find_map(|line| line.trim_start().strip_prefix(&label))
        .map(|rest| {
            rest.split_whitespace()
                .take(cpus)
                .map_while(|n| n.parse::<u64>().ok())
                .sum()
        })
}
