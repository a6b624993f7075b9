// The pictures a reply drew (a build with signal tokens and a generator), for the page (index.html) and its node
// test (tests/serve/test_page_pictures.py). No DOM here but what `doc` (the page's document) makes.
"use strict";

const PICTURE_URL = /^data:image\/(png|jpeg|webp);base64,[A-Za-z0-9+/=]+$/;

// A streamed delta ({"images": [image_url part + nxc fields]}) or an answered message (content parts, with the
// pictures' nxc fields in "images") -> [{index, url, alt}] in order; parts that are not base64 image data are
// dropped (the page shows pictures, it never follows links).
function picturesOf(source) {
  if (!source) return [];
  const fromContent = Array.isArray(source.content);
  const parts = fromContent ? source.content.filter(p => p && p.type === "image_url")
                            : (Array.isArray(source.images) ? source.images : []);
  const out = [];
  parts.forEach((part, k) => {
    const url = part && part.image_url && part.image_url.url;
    if (typeof url !== "string" || !PICTURE_URL.test(url)) return;
    const meta = (fromContent && Array.isArray(source.images) ? source.images[k] : part) || {};
    const index = Number.isInteger(meta.index) ? meta.index : k;
    const how = [meta.steps != null ? `${meta.steps} steps` : null, meta.scheduler || null,
                 meta.guidance != null ? `guidance ${meta.guidance}` : null,
                 meta.seed != null ? `seed ${meta.seed}` : null].filter(Boolean).join(", ");
    out.push({index, url, alt: `Picture ${index} the model drew` + (how ? ` (${how})` : "")});
  });
  return out;
}

// One <img class="picture"> per picture, appended to `container`; returns the new elements.
function showPictures(container, pictures, doc) {
  return pictures.map(p => {
    const img = doc.createElement("img");
    img.className = "picture";
    img.src = p.url;
    img.alt = p.alt;
    img.dataset.index = String(p.index);
    container.append(img);
    return img;
  });
}

if (typeof module !== "undefined") module.exports = {picturesOf, showPictures};
