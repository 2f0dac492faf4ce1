// A share's sealed context (see web_viewer_api/sealed_context.py): encrypted at the producing
// site with AES-256-GCM; the key travels only in the link's fragment (#k=...), which the
// browser never sends to a server. It is kept in this tab's session storage so that the PIN
// page's redirect and a change of language keep it, and decrypted here with WebCrypto.

const AAD = new TextEncoder().encode("dicom-gateway share context v1");
const storageName = () => `dgw-context-key:${location.pathname.replace(/\/+$/, "")}`;

function fromBase64Url(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

/** Keep the fragment's key (if any) for this share in this tab; return it. */
export function keepContextKey() {
  const match = /(?:^#|&)k=([A-Za-z0-9_-]{43})(?:&|$)/.exec(location.hash);
  try {
    if (match) sessionStorage.setItem(storageName(), match[1]);
    return match ? match[1] : sessionStorage.getItem(storageName());
  } catch {
    return match ? match[1] : null;  // storage refused (private mode): the fragment only
  }
}

/** The context as an object of strings; throws when the key does not open it. */
export async function openContext(sealed, key) {
  if (!globalThis.crypto || !crypto.subtle) throw new Error("insecure-context");
  const [version, iv, body] = sealed.split(".");
  if (version !== "v1" || !iv || !body) throw new Error("unknown-format");
  const cryptoKey = await crypto.subtle.importKey("raw", fromBase64Url(key), "AES-GCM", false, ["decrypt"]);
  const plain = await crypto.subtle.decrypt({ name: "AES-GCM", iv: fromBase64Url(iv), additionalData: AAD },
    cryptoKey, fromBase64Url(body));
  const context = JSON.parse(new TextDecoder().decode(plain));
  if (!context || typeof context !== "object" || Array.isArray(context)) throw new Error("unknown-format");
  return Object.fromEntries(Object.entries(context).map(([k, v]) => [String(k), String(v)]));
}
