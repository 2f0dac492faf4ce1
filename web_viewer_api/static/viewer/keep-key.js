// The PIN page of a share: a sealed context's key, in the link's fragment (#k=...), is kept
// in this tab's session storage for the viewer the PIN opens (the redirect after the form
// does not carry the fragment). The fragment is never sent to any server.
import { keepContextKey } from "./context.js";

keepContextKey();
