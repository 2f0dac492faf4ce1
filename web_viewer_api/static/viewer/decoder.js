// Decodes a stored frame off the page's thread: HTJ2K with OpenJPH, JPEG-LS with CharLS, both
// the WebAssembly builds of the cornerstone project, vendored by scripts/vendor_viewer_codecs.py.
// A classic worker, one per codec (`decoder.js?codec=htj2k|jls`): each build defines its own
// global factory. Message in: {id, bytes}; out: {id, bytes} (native little-endian samples) or
// {id, error}.
const CODECS = {
  htj2k: { folder: "openjph", script: "openjphjs.js", factory: () => self.Module, make: (lib) => new lib.HTJ2KDecoder() },
  jls: { folder: "charls", script: "charlswasm_decode.js", factory: () => self.CharLSWASM, make: (lib) => new lib.JpegLSDecoder() },
};
const codec = CODECS[new URL(self.location.href).searchParams.get("codec")];
importScripts(`vendor/${codec.folder}/${codec.script}`);
const ready = codec.factory()({ locateFile: (name) => new URL(`vendor/${codec.folder}/${name}`, self.location.href).href });
ready.then(() => self.postMessage({ ready: true }));  // the page sends frames as stored from now on

self.onmessage = async ({ data: { id, bytes, warm } }) => {
  if (warm) return;  // started early: the WebAssembly is compiling already
  try {
    const lib = await ready;
    const decoder = codec.make(lib);
    try {
      decoder.getEncodedBuffer(bytes.length).set(bytes);
      decoder.decode();
      const decoded = decoder.getDecodedBuffer().slice();  // out of the WebAssembly memory
      self.postMessage({ id, bytes: decoded }, [decoded.buffer]);
    } finally {
      decoder.delete();
    }
  } catch (error) {
    self.postMessage({ id, error: String((error && error.message) || error) });
  }
};
