// Incremental MD5 and SHA-256 over byte chunks. WebCrypto digests only whole buffers (no
// streaming, no MD5), so a file of any size is hashed here, part by part: SHA-256 of the
// whole file for the session, MD5 of each part for its presigned URL (storage checks the
// part's Content-MD5 against the bytes it receives).

class Block64 {
  constructor() { this.buf = new Uint8Array(64); this.used = 0; this.length = 0; }

  update(data) {
    let i = 0;
    this.length += data.length;
    if (this.used) {
      const n = Math.min(64 - this.used, data.length);
      this.buf.set(data.subarray(0, n), this.used);
      this.used += n;
      i = n;
      if (this.used < 64) return this;
      this.block(this.buf, 0);
      this.used = 0;
    }
    for (; i + 64 <= data.length; i += 64) this.block(data, i);
    if (i < data.length) { this.buf.set(data.subarray(i), 0); this.used = data.length - i; }
    return this;
  }

  // Padding: 0x80, zeros, then the length in bits (64 bits, `bigEndian` or little).
  pad(bigEndian) {
    const bits = this.length * 8;
    const hi = Math.floor(bits / 0x100000000), lo = bits >>> 0;
    const tail = new Uint8Array(((this.used < 56) ? 64 : 128) - this.used);
    tail[0] = 0x80;
    const v = new DataView(tail.buffer);
    if (bigEndian) { v.setUint32(tail.length - 8, hi); v.setUint32(tail.length - 4, lo); }
    else { v.setUint32(tail.length - 8, lo, true); v.setUint32(tail.length - 4, hi, true); }
    const length = this.length;
    this.update(tail);
    this.length = length;
  }
}

const SHA_K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

export class Sha256 extends Block64 {
  constructor() {
    super();
    this.h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
    this.w = new Uint32Array(64);
  }

  block(d, o) {
    const w = this.w, h = this.h;
    for (let t = 0; t < 16; t++) w[t] = (d[o + 4 * t] << 24) | (d[o + 4 * t + 1] << 16) | (d[o + 4 * t + 2] << 8) | d[o + 4 * t + 3];
    for (let t = 16; t < 64; t++) {
      const x = w[t - 15], y = w[t - 2];
      const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
      const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
      w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
    }
    let a = h[0], b = h[1], c = h[2], e = h[4], f = h[5], g = h[6], dd = h[3], hh = h[7];
    for (let t = 0; t < 64; t++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const ch = (e & f) ^ (~e & g);
      const t1 = (hh + S1 + ch + SHA_K[t] + w[t]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const maj = (a & b) ^ (a & c) ^ (b & c);
      const t2 = (S0 + maj) | 0;
      hh = g; g = f; f = e; e = (dd + t1) | 0; dd = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += dd; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }

  digest() {
    this.pad(true);
    const out = new Uint8Array(32), v = new DataView(out.buffer);
    this.h.forEach((x, i) => v.setUint32(4 * i, x));
    return out;
  }
}

const MD5_S = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
const MD5_K = new Uint32Array(64).map((_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 0x100000000));

export class Md5 extends Block64 {
  constructor() {
    super();
    this.h = new Uint32Array([0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]);
    this.m = new Uint32Array(16);
  }

  block(d, o) {
    const m = this.m, h = this.h;
    for (let t = 0; t < 16; t++) m[t] = d[o + 4 * t] | (d[o + 4 * t + 1] << 8) | (d[o + 4 * t + 2] << 16) | (d[o + 4 * t + 3] << 24);
    let a = h[0], b = h[1], c = h[2], dd = h[3];
    for (let i = 0; i < 64; i++) {
      let f, g;
      if (i < 16) { f = (b & c) | (~b & dd); g = i; }
      else if (i < 32) { f = (dd & b) | (~dd & c); g = (5 * i + 1) & 15; }
      else if (i < 48) { f = b ^ c ^ dd; g = (3 * i + 5) & 15; }
      else { f = c ^ (b | ~dd); g = (7 * i) & 15; }
      f = (f + a + MD5_K[i] + m[g]) | 0;
      const s = MD5_S[(i >> 4) * 4 + (i & 3)];
      a = dd; dd = c; c = b;
      b = (b + ((f << s) | (f >>> (32 - s)))) | 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += dd;
  }

  digest() {
    this.pad(false);
    const out = new Uint8Array(16), v = new DataView(out.buffer);
    this.h.forEach((x, i) => v.setUint32(4 * i, x, true));
    return out;
  }
}

export const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
export const base64 = (b) => btoa(String.fromCharCode(...b));
