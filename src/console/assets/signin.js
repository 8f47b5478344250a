// Sign-in: an admin token typed into a form, checked against the API.

import {h, field} from './dom.js';
import {setToken, clearToken, whoami} from './api.js';

export function render({main, signedIn}) {
  const input = h('input', {
    type: 'password', name: 'token', required: true, autocomplete: 'off', spellcheck: 'false', class: 'mono',
  });
  const error = h('p', {class: 'error', role: 'alert', hidden: true});
  const submit = h('button', {type: 'submit'}, 'Sign in');
  const form = h('form', {class: 'signin card', 'aria-labelledby': 'signin-title', novalidate: true},
    h('h1', {id: 'signin-title'}, 'Sign in to keygate'),
    h('p', {}, 'Use an admin token from this node\'s ', h('code', {}, 'admin.tokens'), '. ',
      'It is kept in this tab\'s session storage only, and forgotten when you sign out or close the tab.'),
    field('Admin token', input),
    error,
    h('div', {class: 'actions'}, submit));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      error.textContent = 'Enter a token.';
      error.hidden = false;
      input.focus();
      return;
    }
    submit.disabled = true;
    error.hidden = true;
    setToken(value);
    try {
      const me = await whoami();
      input.value = '';
      signedIn(me);
    } catch (e) {
      clearToken();
      error.textContent = e.status === 401 ? 'That token is not valid on this node.' : e.message;
      error.hidden = false;
      input.select();
      input.focus();
    } finally {
      submit.disabled = false;
    }
  });
  main.appendChild(form);
  input.focus();
}
