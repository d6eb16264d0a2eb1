export async function render() { document.body.textContent = "tbdiag"; }
