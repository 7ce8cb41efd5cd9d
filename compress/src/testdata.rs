//! Page generators shared by unit tests, property tests and benches (included
//! with `#[path]`, not part of the library). They mirror the engine's test
//! workload: text-like pages of 64-byte lines picked from 8 fixed lines, and
//! random pages of splitmix64 output.

#![allow(dead_code)]

const PAGE_SIZE: usize = 4096;

/// The fixed lines text pages are built from, 64 bytes each.
const LINES: [&[u8; 64]; 8] = [
    b"2024-05-01T12:00:00Z INFO  ferry: migration started, 2 streams.\n",
    b"2024-05-01T12:00:01Z DEBUG engine: round 1, 524288 dirty pages.\n",
    b"GET /api/v1/status HTTP/1.1 200 OK 0.4ms user-agent: curl/8.1.2\n",
    b"fn main() { println!(\"hello, world\"); let x = vec![0u8; 4096];}\n",
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do\n",
    b"{\"id\": 42, \"name\": \"ferry\", \"tags\": [\"vm\", \"kvm\"], \"ok\": true }\n",
    b"SELECT id, name FROM guests WHERE state = 'running' LIMIT 1000;\n",
    b"#include <linux/kvm.h> /* KVM_GET_DIRTY_LOG,KVM_SET_USER_MEM */\n",
];

/// The splitmix64 step: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A page of splitmix64 output: incompressible.
pub fn random_page(state: &mut u64) -> Vec<u8> {
    let mut page = Vec::with_capacity(PAGE_SIZE);
    while page.len() < PAGE_SIZE {
        page.extend_from_slice(&splitmix64(state).to_le_bytes());
    }
    page
}

/// A page of 64-byte lines picked from 8 fixed lines: compresses to about 20%.
pub fn text_page(state: &mut u64) -> Vec<u8> {
    let mut page = Vec::with_capacity(PAGE_SIZE);
    while page.len() < PAGE_SIZE {
        let line = LINES[(splitmix64(state) % LINES.len() as u64) as usize];
        page.extend_from_slice(line);
    }
    page
}
